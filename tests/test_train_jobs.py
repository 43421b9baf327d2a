"""The training jobs on the tiny model over a tmp lake: end to end, resume, bad inputs, CLI.

``gold.kd_dataset`` + ``gold.kd_requests`` are written with ``lake_io.merge_rows`` in the
catalogue schema: prompts are the real education-stage templates rendered over excerpts of the
embedded sample corpus, "teacher" answers are MATH500 problem/solution pairs (real text in the
reply format). Training runs a few steps on CPU (tiny model; seconds per run).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from jzlake.settings import Settings
from models import lake_io
from models.generation.prompt_library import load_templates
from models.train import data, jiuzhang, synthesizer
from models.train.job import COMPLETE_MARKER, TRAINING_KEY_TAG, run_folder
from tests.conftest import SAMPLE, make_settings

REPO = Path(__file__).resolve().parents[1]
# A few steps of the tiny model: small batches, short sequences, no format seed unless asked.
TINY_TRAIN = {"cpu": {"epochs": 1, "global_batch_size": 4, "micro_batch_size": 2, "max_length": 768,
                      "learning_rate": 1e-3}, "checkpoint_every": 2, "torch_threads": 1, "seed": 7}


def train_settings(tmp_path: Path, register: bool = False, **train: Any) -> Settings:
    job = {**TINY_TRAIN, "register_version": register}
    return make_settings(tmp_path, mlflow={"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
                                           "artifact_root": str(tmp_path / "artifacts")},
                         train={"synthesizer": {**job, "format_seed": False, **train.get("synthesizer", {})},
                                "jiuzhang": {**job, **train.get("jiuzhang", {})}})


def _math_pairs(n: int) -> list[dict[str, Any]]:
    lines = (SAMPLE / "benchmarks" / "math500" / "test.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines[:n]]


def _excerpts(n: int) -> list[str]:
    texts = []
    for path in sorted((SAMPLE / "raw_corpus").rglob("*.jsonl")):
        for line in path.read_text().splitlines():
            text = json.loads(line).get("text") or ""
            if len(text) > 400:
                texts.append(text[:600])
            if len(texts) == n:
                return texts
    return texts


def write_kd_lake(settings: Settings, n: int = 12) -> None:
    """``n`` accepted KD rows and their ledger rows (the teacher's exact chat)."""
    templates = load_templates()
    stage_ids = ["cot_grade_school", "cot_middle_school", "cot_high_school", "cot_college"]
    kd_rows, ledger_rows = [], []
    for i, (pair, excerpt) in enumerate(zip(_math_pairs(n), _excerpts(n), strict=True)):
        template = templates[stage_ids[i % len(stage_ids)]]
        key = f"kd-{i:04d}"
        messages = [{"role": r, "content": c} for r, c in template.render(excerpt)]
        text = f"## Question\n{pair['problem']}\n\n## Solution\n{pair['solution']}"
        kd_rows.append({"request_key": key, "text": text,
                        "problem": pair["problem"], "solution": pair["solution"], "answer": pair.get("answer"),
                        "doc_id": f"doc-{i}", "template_id": template.id, "template_hash": template.sha256,
                        "stage": template.stage, "kind": "cot", "run_id": "test-distil"})
        ledger_rows.append({"key": key, "status": "succeeded", "template_id": template.id,
                            "messages": json.dumps(messages), "prompt": messages[-1]["content"],
                            "key_bucket": key[-2:], "run_id": "test-distil"})
    lake_io.merge_rows(settings, "gold.kd_requests", ledger_rows)
    lake_io.merge_rows(settings, "gold.kd_dataset", kd_rows)


def write_problems_lake(settings: Settings, n: int = 10) -> None:
    rows = [{"request_key": f"syn-{i:04d}", "problem": p["problem"], "solution": p["solution"],
             "text": f"## Question\n{p['problem']}\n\n## Solution\n{p['solution']}", "kind": "cot",
             "run_id": "test-filter"} for i, p in enumerate(_math_pairs(n))]
    lake_io.merge_rows(settings, "gold.synthetic_problems", rows)


def model_weights(model_dir: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    weights: dict[str, Any] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        weights.update(load_file(str(path)))
    return weights


# ---- synthesizer --------------------------------------------------------------------------------

@pytest.mark.mlflow
def test_synthesizer_trains_saves_and_reuses_its_run_folder(tmp_path: Path) -> None:
    settings = train_settings(tmp_path)
    write_kd_lake(settings)
    summary = synthesizer.run(settings)
    assert summary["finished"] and not summary["registered"]
    pinned = {t: lake_io.current_version(settings, t) for t in ("gold.kd_dataset", "gold.kd_requests")}
    assert summary["data_tables"] == pinned
    assert summary["counts"] == {"kd_cot": 12} and summary["format_seed"] is False
    assert summary["steps"] == summary["steps_run"] > 0
    assert summary["tokens_trained"] > 0 and summary["loss_first"] > summary["loss_last"] > 0
    model_dir = Path(summary["model_dir"])
    assert (model_dir / COMPLETE_MARKER).is_file() and list(model_dir.glob("*.safetensors"))

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert tokenizer.chat_template, "the saved synthesizer keeps the chat template synthesis renders with"
    AutoModelForCausalLM.from_pretrained(model_dir)

    again = synthesizer.run(settings)  # same inputs: the finished run folder is found, nothing retrained
    assert again["training_key"] == summary["training_key"] and "train_s" not in again["stage_seconds"]

    lake_io.merge_rows(settings, "gold.kd_dataset", [{"request_key": "kd-0000", "problem": "changed"}])
    changed = synthesizer.run(settings.model_copy(update={"train": settings.train.model_copy(update={
        "synthesizer": settings.train.synthesizer.model_copy(update={"checkpoint_every": 100})})}))
    assert changed["data_tables"]["gold.kd_dataset"] == pinned["gold.kd_dataset"] + 1
    assert changed["training_key"] != summary["training_key"], "a new KD version is a new training"


def test_format_seed_examples_use_education_prompts_and_parseable_targets(tmp_path: Path) -> None:
    from models.generation.parsing import parse_reply

    settings = train_settings(tmp_path, synthesizer={"format_seed": True, "format_seed_samples": 20})
    examples, files = synthesizer.format_seed_examples(settings, settings.train.synthesizer)
    assert len(examples) == 20 and list(files) == [str(SAMPLE / "benchmarks/gsm8k/train.head600.jsonl")]
    questions = {json.loads(line)["question"] for line in
                 (SAMPLE / "benchmarks/gsm8k/train.head600.jsonl").read_text().splitlines()}
    for example in examples:
        assert example.source.startswith("format_seed:cot_")
        prompt = example.messages[-1]["content"]
        assert "## Output format" in prompt and "{{excerpt}}" not in prompt
        parsed = parse_reply(example.target, "stop", "cot")
        assert parsed.accepted, parsed.detail
        assert parsed.problem in questions and parsed.problem not in prompt  # never its own excerpt


@pytest.mark.mlflow
def test_killed_training_resumes_to_the_same_weights(tmp_path: Path) -> None:
    """Stop after step 3 (checkpoint at step 2 and at the stop), resume: the final weights equal an
    uninterrupted run's; the resumed run starts at the checkpointed step."""
    plain = train_settings(tmp_path / "plain")
    write_kd_lake(plain)
    uninterrupted = synthesizer.run(plain)

    interrupted = train_settings(tmp_path / "killed")
    write_kd_lake(interrupted)
    from models.train.job import JobOptions

    first = synthesizer.run(interrupted, JobOptions(stop_after_step=1))
    assert first["finished"] is False and first["steps_run"] == 1
    second = synthesizer.run(interrupted)
    assert second["finished"] and second["resumed_from_step"] == 1
    assert second["steps_run"] == uninterrupted["steps"] - 1
    assert second["training_key"] == uninterrupted["training_key"]
    assert second["loss_last"] == pytest.approx(uninterrupted["loss_last"], rel=1e-5)
    a, b = model_weights(Path(uninterrupted["model_dir"])), model_weights(Path(second["model_dir"]))
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name] - b[name]).abs().max().item() < 1e-5, name


@pytest.mark.mlflow
def test_registered_with_lineage_and_alias_and_never_twice(tmp_path: Path) -> None:
    from models import registry

    settings = train_settings(tmp_path, register=True)
    write_kd_lake(settings, n=6)
    summary = synthesizer.run(settings)
    assert summary["registered"] and summary["version"] == "1" and summary["alias"] == "challenger"
    version = registry.get_by_alias(settings, "jiuzhang-synthesizer", "challenger")
    assert version is not None and version.version == "1" and version.run_id == summary["run_id"]
    assert registry.TRAINING_KEY_TAG == TRAINING_KEY_TAG
    tags = version.tags
    assert tags[TRAINING_KEY_TAG] == summary["training_key"] and tags["training_run_id"] == summary["run_id"]
    assert tags["base_model"] == "tiny-llama" and tags["format_seed"] == "false"
    assert json.loads(tags["data_tables"]) == summary["data_tables"] and len(tags["git_sha"]) >= 7

    run = registry.configure(settings).get_run(summary["run_id"])
    assert run.data.params["recipe.learning_rate"] == "0.001" and "pkg.torch" in run.data.params
    assert {d.dataset.name for d in run.inputs.dataset_inputs} == {"gold.kd_dataset", "gold.kd_requests"}
    history = registry.client(settings).get_metric_history(summary["run_id"], "loss")
    assert [m.step for m in history] == list(range(summary["steps"]))

    again = synthesizer.run(settings)  # same inputs: found by training key before any training
    assert again["reused"] and again["version"] == "1" and not again["registered"]
    assert len(registry.client(settings).search_model_versions("name = 'jiuzhang-synthesizer'")) == 1

    from transformers import AutoModelForCausalLM

    path = registry.resolve_model_path(settings, "models:/jiuzhang-synthesizer@challenger")
    AutoModelForCausalLM.from_pretrained(path)


@pytest.mark.slow
@pytest.mark.mlflow
def test_sigkilled_subprocess_resumes_to_the_same_weights(tmp_path: Path) -> None:
    """A real SIGKILL once the first checkpoint exists; the rerun resumes and ends where an
    uninterrupted run does."""
    import os
    import signal
    import time

    settings = train_settings(tmp_path / "killed", synthesizer={"checkpoint_every": 1})
    write_kd_lake(settings, n=20)
    config = tmp_path / "settings.yaml"
    import yaml

    config.write_text(yaml.safe_dump(json.loads(settings.model_dump_json())))
    command = [sys.executable, "-m", "models.train.synthesizer", "--config", str(config)]
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    checkpoints = Path(settings.runs_dir) / "train" / "synthesizer"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if list(checkpoints.glob("*/checkpoints/step-*/state.json")):
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the job finished before it could be killed"
    rerun = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True)
    resumed = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert resumed["finished"] and resumed["resumed_from_step"] >= 1

    plain = train_settings(tmp_path / "plain", synthesizer={"checkpoint_every": 1})
    write_kd_lake(plain, n=20)
    reference = synthesizer.run(plain)
    a, b = model_weights(Path(reference["model_dir"])), model_weights(Path(resumed["model_dir"]))
    for name in a:
        assert (a[name] - b[name]).abs().max().item() < 1e-5, name


# ---- bad inputs: a clear error before any compute, nothing trained or registered ---------------

def _nothing_trained(settings: Settings, job: str) -> None:
    assert not (Path(settings.runs_dir) / "train" / job).exists()


def test_missing_and_empty_input_tables_name_the_stage(tmp_path: Path) -> None:
    settings = train_settings(tmp_path)
    with pytest.raises(data.TrainingInputError, match=r"gold.kd_dataset does not exist.*`jzlake distil`"):
        synthesizer.run(settings)
    lake_io.ensure_table(settings, "gold.kd_dataset")
    with pytest.raises(data.TrainingInputError, match=r"gold.kd_dataset is empty at version 0: run `jzlake distil`"):
        synthesizer.run(settings)
    seeded = settings.train.synthesizer.model_copy(update={"format_seed": True, "format_seed_samples": 5})
    only_seed = synthesizer.read_inputs(settings, seeded)  # the tiny teacher's KD set may be empty
    assert only_seed.counts == {"format_seed": 5} and "trained on the format seed only" in only_seed.notes["warning"]
    with pytest.raises(data.TrainingInputError, match=r"gold.synthetic_problems does not exist.*jzlake synthesize"):
        jiuzhang.run(settings)
    lake_io.ensure_table(settings, "gold.synthetic_problems")
    with pytest.raises(data.TrainingInputError, match=r"gold.synthetic_problems is empty.*filter-synthetic"):
        jiuzhang.run(settings)
    _nothing_trained(settings, "synthesizer")
    _nothing_trained(settings, "jiuzhang")


def test_max_length_shorter_than_the_prompt_is_refused(tmp_path: Path) -> None:
    settings = train_settings(tmp_path, synthesizer={"cpu": {**TINY_TRAIN["cpu"], "max_length": 64}})
    write_kd_lake(settings, n=4)
    with pytest.raises(data.TrainingInputError, match=r"the prompt is \d+ tokens, max_length is 64"):
        synthesizer.run(settings)
    _nothing_trained(settings, "synthesizer")


@pytest.mark.mlflow
def test_unresolvable_base_model_is_refused(tmp_path: Path) -> None:
    unknown = {"cpu": {**TINY_TRAIN["cpu"], "base_model": "models:/nope@champion"}}
    settings = train_settings(tmp_path, synthesizer=unknown)
    write_kd_lake(settings, n=4)
    with pytest.raises(data.TrainingInputError, match=r"base model 'models:/nope@champion' does not resolve"):
        synthesizer.run(settings)
    missing_dir = train_settings(tmp_path / "dir", synthesizer={"cpu": {**TINY_TRAIN["cpu"],
                                                                        "base_model": str(tmp_path / "absent")}})
    write_kd_lake(missing_dir, n=4)
    with pytest.raises(data.TrainingInputError, match=r"does not resolve.*no config.json"):
        synthesizer.run(missing_dir)
    _nothing_trained(settings, "synthesizer")


def test_tokenizer_without_chat_template_is_refused(tmp_path: Path) -> None:
    import shutil

    from models.tiny import ensure_tiny_model

    settings = train_settings(tmp_path)
    plain = tmp_path / "no-template"
    shutil.copytree(ensure_tiny_model(settings), plain)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template")
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    settings = train_settings(tmp_path, synthesizer={"cpu": {**TINY_TRAIN["cpu"], "base_model": str(plain)}})
    write_kd_lake(settings, n=4)
    with pytest.raises(data.TrainingInputError, match="has no chat template"):
        synthesizer.run(settings)
    _nothing_trained(settings, "synthesizer")


# ---- jiuzhang -----------------------------------------------------------------------------------

@pytest.mark.mlflow
def test_jiuzhang_trains_synthetic_then_sft_in_order(tmp_path: Path) -> None:
    settings = train_settings(tmp_path, jiuzhang={"max_sft_samples": 6})
    write_problems_lake(settings)
    inputs = jiuzhang.read_inputs(settings, settings.train.jiuzhang)
    sources = [e.source for e in inputs.examples]
    assert sources[:10] == ["gold.synthetic_problems:cot"] * 10 and len(sources) == 16
    assert all(s.startswith("sft:train.head600") for s in sources[10:])
    assert inputs.examples[10].prompt.startswith("## Question\nNatalia sold clips")
    first_sft = inputs.examples[10].target
    assert first_sft.endswith("The answer is $\\boxed{72}$.") and "<<" not in first_sft
    summary = jiuzhang.run(settings)
    assert summary["finished"] and summary["counts"]["sft_examples"] == 6 and summary["counts"]["cpt_examples"] == 10
    assert summary["tokens_trained"] > 0 and (Path(summary["model_dir"]) / COMPLETE_MARKER).is_file()
    assert run_folder(settings, "jiuzhang", summary["training_key"]) == Path(summary["model_dir"]).parent


@pytest.mark.mlflow
def test_lora_trains_adapters_and_saves_a_merged_model(tmp_path: Path) -> None:
    from models.tiny import ensure_tiny_model

    # 4 samples, one per step: the WSD warm-up's first step has lr 0, the next ones move the adapters
    lora = {**TINY_TRAIN["cpu"], "method": "lora", "lora_r": 4, "learning_rate": 1e-2, "global_batch_size": 1,
            "micro_batch_size": 1, "packing": False}
    settings = train_settings(tmp_path, jiuzhang={"cpu": lora, "max_sft_samples": 2})
    write_problems_lake(settings, n=2)
    summary = jiuzhang.run(settings)
    assert summary["finished"] and summary["method"] == "lora"
    trained = model_weights(Path(summary["model_dir"]))
    base = model_weights(ensure_tiny_model(settings))
    assert trained.keys() == base.keys(), "adapters merged: a plain model, loadable without peft"
    changed = [k for k in base if not (trained[k] == base[k]).all()]
    assert changed and all(any(m in k for m in ("q_proj", "k_proj", "v_proj", "o_proj")) for k in changed)


@pytest.mark.slow
@pytest.mark.mlflow
def test_cli_prints_the_summary_last(tmp_path: Path) -> None:
    from jzlake import cli

    settings = train_settings(tmp_path)
    write_kd_lake(settings, n=4)
    config = tmp_path / "settings.yaml"
    import yaml

    config.write_text(yaml.safe_dump(json.loads(settings.model_dump_json())))
    result = subprocess.run([sys.executable, "-m", "jzlake.cli", "train", "synthesizer", "--config", str(config),
                             "--no-register", "--epochs", "1", "--global-batch-size", "2"],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["model_name"] == "jiuzhang-synthesizer" and summary["finished"] and summary["steps"] == 2
    assert {"version", "alias", "run_id", "tokens_trained", "loss_first", "loss_last", "seconds"} <= set(summary)
    assert cli.COMMANDS["train"][0] == "models.train.cli"


@pytest.mark.slow
@pytest.mark.mlflow
def test_dispatched_like_the_influence_job(tmp_path: Path) -> None:
    """The local GPU backend runs ``python -m models.train.jiuzhang`` and returns its summary; a
    retry finds the completion marker. Multi-GPU specs go through ``accelerate launch`` (FSDP)."""
    import yaml

    from models.train.dispatch import train_job_spec
    from plugins.gpu_job import GpuJobOperator, markers_for

    settings = train_settings(tmp_path, jiuzhang={"max_sft_samples": 2})
    settings = settings.model_copy(update={"gpu": settings.gpu.model_copy(update={"markers_dir": str(tmp_path / "m")})})
    write_problems_lake(settings, n=4)
    config = tmp_path / "settings.yaml"
    config.write_text(yaml.safe_dump(json.loads(settings.model_dump_json())))
    spec = train_job_spec("jiuzhang", args=["--config", str(config), "--device", "cpu", "--no-register"],
                          run_key="run-1")
    assert spec.command("python")[:3] == ["python", "-m", "models.train.jiuzhang"] and spec.resources.gpus == 1
    summary = GpuJobOperator(task_id="train", spec=spec.model_dump(), settings=settings).execute({})
    assert summary["stage"] == "train-jiuzhang" and summary["finished"] and summary["counts"]["sft_examples"] == 2
    assert markers_for(settings).read(spec)["summary"] == summary
    assert GpuJobOperator(task_id="train", spec=spec.model_dump(), settings=settings).execute({}) == summary

    multi = train_job_spec("synthesizer", gpus=8, args=["--device", "cuda"])
    assert multi.command("python") == ["python", "-m", "accelerate.commands.launch", "--config_file",
                                       "infra/accelerate/fsdp.yaml", "--num_processes", "8", "-m",
                                       "models.train.synthesizer", "--device", "cuda"]
    from accelerate.commands.config.config_args import load_config_from_file

    fsdp = load_config_from_file(str(REPO / "infra/accelerate/fsdp.yaml"))
    assert fsdp.distributed_type == "FSDP" and fsdp.mixed_precision == "bf16"
