"""End to end: `jzlake influence` on the tiny model over a curated sample lake writes
gold.influence_scores and gold.selected_texts and an MLflow run; reruns change nothing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from jzlake import cli
from models import lake_io
from tests.conftest import SAMPLE, make_settings

pytestmark = [pytest.mark.slow, pytest.mark.mlflow]

INFLUENCE = {"projection_dim": 512, "max_seq_len": 96, "targets_per_subtask": 2, "warmup_epochs": 2,
             "warmup_min_examples": 4, "torch_threads": 1, "num_shards": 2, "grad_chunk_size": 16}


def sample_corpus() -> list[dict[str, Any]]:
    """gold.corpus rows from the embedded sample (the curation stage's output shape)."""
    rows = []
    qa = (SAMPLE / "raw_corpus/stackmathqa/stackmathqa100k_partial.head300.jsonl").read_text().splitlines()
    for i, line in enumerate(qa[:16]):
        record = json.loads(line)
        rows.append({"doc_id": f"stackmathqa:{i:03d}", "source": "stackmathqa",
                     "text": f"{record['Q']}\n\n{record['A']}"})
    mo = (SAMPLE / "raw_corpus/mathlm_stackexchange/math_overflow_40votes.head120.jsonl").read_text().splitlines()
    for i, line in enumerate(mo[:8]):
        record = json.loads(line)
        rows.append({"doc_id": f"mathoverflow:{i:03d}", "source": "mathlm_stackexchange",
                     "text": f"{record['input']}\n\n{record['output']}"})
    return [{**r, "n_words": len(r["text"].split()), "run_id": "curate-test"} for r in rows]


def run_cli(capsys: pytest.CaptureFixture, config: Path, *args: str) -> dict[str, Any]:
    assert cli.main(["influence", "--config", str(config), *args]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.fixture
def lake(tmp_path: Path) -> tuple[Any, Path]:
    overrides = {"lake": {"root": str(tmp_path / "lake"), "runs_dir": str(tmp_path / "runs")},
                 "mlflow": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
                            "artifact_root": str(tmp_path / "mlartifacts")},
                 "influence": INFLUENCE}
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(overrides))
    settings = make_settings(tmp_path, **{k: v for k, v in overrides.items() if k != "lake"})
    lake_io.merge_rows(settings, "gold.corpus", sample_corpus())
    return settings, config


def table(settings: Any, name: str) -> tuple[list[dict[str, Any]], int]:
    rows, version = lake_io.read_table_at(settings, name)
    return rows.to_pylist(), version


def test_influence_end_to_end_and_rerun_changes_nothing(lake: tuple, capsys: pytest.CaptureFixture) -> None:
    settings, config = lake
    corpus = {r["doc_id"]: r["text"] for r in sample_corpus()}
    summary = run_cli(capsys, config, "--top-k", "5")

    assert summary["candidates"] == len(corpus) and summary["selected"] == 5
    assert summary["input_version"] == 1 and summary["tables"]["gold.influence_scores"]["inserted"] == len(corpus)
    assert [s["units"] for s in summary["shards"]] == [12, 12]
    scores, scores_version = table(settings, "gold.influence_scores")
    assert len(scores) == len(corpus)
    for row in scores:
        subtasks = dict(row["subtask_scores"])
        assert len(subtasks) == 8 and "gsm8k" in subtasks and "math/Geometry" in subtasks
        assert row["score"] == pytest.approx(max(subtasks.values()))
        assert -1.0 <= row["score"] <= 1.0
        assert row["checkpoints"] == ["epoch-1", "epoch-2"] and sum(row["checkpoint_weights"]) == pytest.approx(1)
        assert (row["projection_dim"], row["model"], row["input_version"]) == (512, "tiny-llama", 1)
        assert row["run_id"] == summary["run_id"] and row["candidate_unit"] == "excerpt"
    assert len({round(r["score"], 6) for r in scores}) > len(scores) // 2  # scores discriminate

    selected, selected_version = table(settings, "gold.selected_texts")
    selected.sort(key=lambda r: r["rank"])
    best = sorted(scores, key=lambda r: (-r["score"], r["doc_id"]))[:5]
    assert [r["doc_id"] for r in selected] == [r["doc_id"] for r in best]
    for row in selected:
        assert 0 < len(row["excerpt"]) <= 1000
        assert corpus[row["doc_id"]][row["excerpt_start"]:row["excerpt_end"]] == row["excerpt"]

    import mlflow

    from models import registry

    run = mlflow.get_run(summary["mlflow_run_id"])
    assert run.data.params["projection_dim"] == "512" and run.data.metrics["selected"] == 5
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"score_histogram.png", "summary.json"} <= artifacts
    assert registry.tracking_uri(settings).startswith("sqlite:///")

    # Rerun: same content-addressed run, shards skipped, nothing committed, same MLflow run.
    again = run_cli(capsys, config, "--top-k", "5")
    assert again["run_id"] == summary["run_id"] and not again["prepared"]
    assert all(s["skipped"] for s in again["shards"]) and again["mlflow_run_id"] == summary["mlflow_run_id"]
    assert table(settings, "gold.influence_scores")[1] == scores_version
    assert table(settings, "gold.selected_texts")[1] == selected_version

    # The DAG's path: phases by run name; a forced recomputation of a shard stages identical rows.
    prepared = run_cli(capsys, config, "--phase", "prepare", "--run-name", "manual__2026-01-01T00:00:00+00:00")
    assert prepared["reused"] and prepared["run_id"] == summary["run_id"]
    rescored = run_cli(capsys, config, "--phase", "score", "--run-name", "manual__2026-01-01T00:00:00+00:00",
                       "--shard-index", "1", "--num-shards", "2", "--force")
    assert rescored["shards"][0]["units"] == 12 and not rescored["shards"][0]["skipped"]
    committed = run_cli(capsys, config, "--phase", "commit", "--run-name", "manual__2026-01-01T00:00:00+00:00",
                        "--num-shards", "2", "--top-k", "5")
    assert not committed["tables"]["gold.influence_scores"]["committed"]
    assert not committed["tables"]["gold.selected_texts"]["committed"]
    assert table(settings, "gold.influence_scores")[1] == scores_version


def test_pair_candidates_attribute_scores_to_source_texts(lake: tuple, capsys: pytest.CaptureFixture,
                                                          tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    settings, config = lake
    docs = [r["doc_id"] for r in sample_corpus()][:3]
    pairs = [{"doc_id": d, "prompt": f"Write a new problem inspired by document {d}.\n",
              "completion": f"## Question\nWhat is {i} + {j}?\n\n## Solution\n{i} + {j} = {i + j}. \\boxed{{{i + j}}}"}
             for i, d in enumerate(docs) for j in (1, 2)]
    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist(pairs), path)
    summary = run_cli(capsys, config, "--candidate-unit", "pair", "--pairs-path", str(path), "--top-k", "2",
                      "--no-mlflow")
    assert summary["candidates"] == 3 and summary["selected"] == 2
    rows = [r for r in table(settings, "gold.influence_scores")[0] if r["run_id"] == summary["run_id"]]
    assert {r["doc_id"] for r in rows} == set(docs)
    assert all(r["n_units"] == 2 and r["candidate_unit"] == "pair" for r in rows)
    selected = table(settings, "gold.selected_texts")[0]
    assert {r["run_id"] for r in selected} == {summary["run_id"]} and len(selected) == 2


def test_a_copy_of_a_target_ranks_first_and_only_candidates_are_preconditioned(
        lake: tuple, capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    """Scores mean something: a pair identical to a target example wins, and the job's numbers equal
    LESS recomputed here from per-example gradients (one backward each, the reference path) —
    targets' features plain, candidates' through Adam with the checkpoint's moments."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from safetensors.torch import load_file

    from models.influence import data
    from models.influence.gradients import per_example_gradients
    from models.influence.job import load_manifest, load_model, model_reference, run_dir
    from models.influence.projection import RademacherProjector
    from models.influence.warmup import attach_lora, load_checkpoint

    settings, config = lake
    run_config = settings.influence
    model, tokenizer, pad_id = load_model(model_reference(settings, run_config)[0], "cpu")
    encode = lambda p, c: data.encode(tokenizer, p, c, run_config.max_seq_len)  # noqa: E731
    targets = data.load_targets(settings, run_config, fits=lambda t: encode(t.prompt, t.completion).n_loss_tokens > 0)
    copied = next(t for t in targets if t.subtask == "gsm8k")
    # Competitors in the very same format: GSM8K training items that are not targets.
    target_prompts = {t.prompt for t in targets}
    gsm8k = [json.loads(line) for line in (SAMPLE / "benchmarks/gsm8k/train.head600.jsonl").read_text().splitlines()]
    others = [r for r in gsm8k if data.TRAIN_PROMPT.format(question=r["question"].strip()) not in target_prompts][:5]
    docs = [r["doc_id"] for r in sample_corpus()][:6]
    pairs = [{"doc_id": docs[0], "prompt": copied.prompt, "completion": copied.completion}] + [
        {"doc_id": doc, "prompt": data.TRAIN_PROMPT.format(question=r["question"].strip()), "completion": r["answer"]}
        for doc, r in zip(docs[1:], others, strict=True)]
    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist(pairs), path)
    summary = run_cli(capsys, config, "--candidate-unit", "pair", "--pairs-path", str(path), "--top-k", "1",
                      "--no-mlflow")
    scores = {r["doc_id"]: r for r in table(settings, "gold.influence_scores")[0] if r["run_id"] == summary["run_id"]}
    assert set(scores) == set(docs)
    best = max(scores.values(), key=lambda r: r["score"])
    assert best["doc_id"] == docs[0], {d: round(r["score"], 4) for d, r in scores.items()}
    assert [r["doc_id"] for r in table(settings, "gold.selected_texts")[0]] == [docs[0]]

    # Recompute every feature at every checkpoint with the loop reference and the formula spelled out.
    manifest = load_manifest(settings, summary["run_id"])
    folder = run_dir(settings, summary["run_id"])
    assert manifest["target_ids"] == [t.item_id for t in targets]
    model = attach_lora(model, run_config, run_config.seed)
    target_batch = [encode(t.prompt, t.completion) for t in targets]
    candidate_batch = [encode(p["prompt"], p["completion"]) for p in pairs]
    projector = RademacherProjector(manifest["lora_parameters"], manifest["projection"]["dim"],
                                    manifest["projection"]["seed"], block_rows=manifest["projection"]["block_rows"])
    saved = load_file(str(folder / "target_features.safetensors"))
    features = lambda g: torch.nn.functional.normalize(projector.project(g), dim=1)  # noqa: E731
    preconditioned_sim, plain_sim = 0.0, 0.0
    for info, weight in zip(manifest["checkpoints"], manifest["checkpoint_weights"], strict=True):
        moments = load_checkpoint(model, folder / "checkpoints" / info["name"], run_config)
        target_features = features(per_example_gradients(model, target_batch, pad_id, "loop"))
        assert torch.allclose(saved[info["name"]], target_features, atol=1e-4)  # targets: plain gradients
        g = per_example_gradients(model, candidate_batch, pad_id, "loop")
        b1, b2, eps = run_config.adam_beta1, run_config.adam_beta2, run_config.adam_eps
        adam = (b1 * moments.exp_avg + (1 - b1) * g) / torch.sqrt(b2 * moments.exp_avg_sq + (1 - b2) * g * g + eps)
        preconditioned_sim = preconditioned_sim + weight * features(adam) @ target_features.T
        plain_sim = plain_sim + weight * features(g) @ target_features.T
        # The same text as candidate and as target: equal gradients, features apart by the preconditioner.
        as_target = target_features[targets.index(copied)]
        assert torch.allclose(features(g[:1])[0], as_target, atol=1e-5)
        assert float(features(adam[:1])[0] @ as_target) < 0.99

    def less_scores(similarity: torch.Tensor) -> list[float]:
        per_subtask = similarity.reshape(len(pairs), len(manifest["subtasks"]), -1).mean(-1)
        return per_subtask.max(-1).values.tolist()

    job = [scores[p["doc_id"]]["score"] for p in pairs]
    assert job == pytest.approx(less_scores(preconditioned_sim), abs=1e-4)
    assert max(abs(a - b) for a, b in zip(job, less_scores(plain_sim), strict=True)) > 1e-3
