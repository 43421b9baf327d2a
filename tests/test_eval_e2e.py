"""End to end: the tiny model, registered in MLflow, evaluated through ``transformers serve`` on
subsets of GSM8K and MATH500 in both settings; rows in ``gold.eval_predictions`` (a rerun adds
nothing), metrics on the version's run, then the gate: the first version is promoted, a second
version without results is refused (tagged, alias unchanged), and once evaluated it passes
against the champion (same weights, same answers) and takes the alias."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jzlake.settings import Settings
from models import lake_io, registry
from models.eval.gate import GateFailed
from models.eval.job import TABLE, evaluate, load_benchmarks, resolve_model, write_results
from models.eval.promote import promote
from models.generation.local_server import LocalServer
from tests.conftest import SAMPLE, make_settings
from tests.llm_fixtures import llm_server, tiny_model_dir  # noqa: F401

pytestmark = [pytest.mark.llm, pytest.mark.mlflow, pytest.mark.slow]
NAME = "jiuzhang-math"
SUBSETS = {"gsm8k": ("gsm8k/test.jsonl", 3), "math500": ("math500/test.jsonl", 2)}


def subset(source: Path, target: Path, n: int) -> str:
    target.write_text("".join(source.read_text(encoding="utf-8").splitlines(keepends=True)[:n]), encoding="utf-8")
    return str(target)


@pytest.fixture
def eval_settings(tmp_path: Path, llm_server: LocalServer) -> Settings:  # noqa: F811
    paths = {name: subset(SAMPLE / "benchmarks" / rel, tmp_path / f"{name}.jsonl", n)
             for name, (rel, n) in SUBSETS.items()}
    return make_settings(
        tmp_path, home=str(tmp_path), models={"cache_dir": str(tmp_path / "model-cache")},
        mlflow={"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "artifact_root": str(tmp_path / "artifacts")},
        benchmarks={"gsm8k": {"path": paths["gsm8k"], "answer_field": "answer"},
                    "math500": {"path": paths["math500"], "id_field": "unique_id", "answer_field": "answer"}},
        generation={"backend": "openai", "base_url": llm_server.base_url,
                    "served_models": {NAME: llm_server.served_model}},
        eval={"benchmarks": ["gsm8k", "math500"], "settings": ["cot", "tool"], "max_new_tokens": 32,
              "concurrency": 4, "gate": {"floors": {"gsm8k": 0.0, "math500/cot": 0.0}}})


def register(settings: Settings, model_dir: Path, round_tag: str) -> registry.RegisteredModel:
    with registry.start_run(settings, f"train {round_tag}", f"train-{round_tag}") as run:
        run_id = run.info.run_id
    return registry.register_model(settings, name=NAME, model_dir=model_dir, run_id=run_id,
                                   tags={"round": round_tag}, alias="challenger")


def run_eval(settings: Settings) -> dict:
    model = resolve_model(settings, f"models:/{NAME}@challenger")
    result = evaluate(settings, model, load_benchmarks(settings, None, None), ["cot", "tool"])
    return {"result": result, **write_results(settings, result)}


def test_tiny_model_evaluated_logged_and_gated(eval_settings: Settings, tiny_model_dir: Path) -> None:  # noqa: F811
    settings = eval_settings
    v1 = register(settings, tiny_model_dir, "1")
    first = run_eval(settings)
    result = first["result"]
    n_items = sum(n for _, n in SUBSETS.values())
    assert set(result.metrics) == {"gsm8k/cot", "gsm8k/tool", "math500/cot", "math500/tool"}
    assert first["table"]["inserted"] == 2 * n_items
    for key, metrics in result.metrics.items():
        assert metrics.items == metrics.items_total == SUBSETS[key.split("/")[0]][1]
        assert 0.0 <= metrics.ci_low <= metrics.accuracy <= metrics.ci_high <= 1.0

    rows, _ = lake_io.read_table_at(settings, TABLE)
    rows = rows.to_pylist()
    assert len(rows) == 2 * n_items
    assert {r["model_version"] for r in rows} == {v1.version} and {r["model_name"] for r in rows} == {NAME}
    assert all(r["prediction"] is not None and r["rounds_used"] >= 1 for r in rows)
    assert {r["spec_hash"] for r in rows} == set(result.spec_hashes.values())

    again = run_eval(settings)  # same version, same specs: MERGE adds nothing
    assert again["table"]["inserted"] == 0
    assert lake_io.read_table_at(settings, TABLE)[0].num_rows == 2 * n_items

    client = registry.client(settings)
    run = client.get_run(v1.run_id)
    assert run.data.metrics["eval/gsm8k/cot/accuracy"] == result.metrics["gsm8k/cot"].accuracy
    assert "eval/math500/tool/execution_error_rate" in run.data.metrics
    assert registry.get_model_version(settings, NAME, v1.version).tags["jzlake.eval.run_id"] == result.run_id
    artifact = Path(client.download_artifacts(v1.run_id, f"eval/{result.run_id}.json", str(settings.home)))
    assert len(json.loads(artifact.read_text())["predictions"]) == 2 * n_items

    # First version, no champion: floors only → promoted.
    decision = promote(settings, NAME)
    assert decision["passed"] and decision["champion"] == v1.version
    assert registry.get_by_alias(settings, NAME, "champion").version == v1.version

    # A second version with no results: refused, tagged, champion unchanged.
    v2 = register(settings, tiny_model_dir, "2")
    with pytest.raises(GateFailed) as refused:
        promote(settings, NAME)
    assert any("missing metrics" in r for r in refused.value.reasons)
    tags = registry.get_model_version(settings, NAME, v2.version).tags
    assert tags["jzlake.gate.decision"] == "fail" and "missing metrics" in tags["jzlake.gate.reasons"]
    assert json.loads(tags["jzlake.gate.spec_hashes"]) == result.spec_hashes
    assert registry.get_by_alias(settings, NAME, "champion").version == v1.version

    # Evaluated: same weights as the champion → same answers → non-inferior → promoted.
    run_eval(settings)
    decision = promote(settings, NAME)
    assert decision["passed"], decision["reasons"]
    assert registry.get_by_alias(settings, NAME, "champion").version == v2.version
    assert registry.get_model_version(settings, NAME, v1.version).tags["jzlake.gate.replaced_by"] == v2.version


def test_cli_eval_and_promote_refuses_partial_results(eval_settings: Settings, tiny_model_dir: Path,  # noqa: F811
                                                      tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    from jzlake.cli import main

    settings = eval_settings
    version = register(settings, tiny_model_dir, "cli")
    config = tmp_path / "eval.yaml"
    config.write_text(yaml.safe_dump(settings.model_dump(mode="json")))

    assert main(["eval", "--config", str(config), "--model", f"models:/{NAME}@challenger", "--setting", "cot",
                 "--limit", "1"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["version"] == version.version and set(summary["results"]) == {"gsm8k/cot", "math500/cot"}
    assert summary["results"]["gsm8k/cot"]["items"] == 1 and summary["table"]["inserted"] == 2

    with pytest.raises(SystemExit) as exit_info:  # --limit 1 and no tool results: partial + missing
        main(["promote", "--config", str(config), NAME])
    assert exit_info.value.code == 3
    refused = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert not refused["passed"]
    assert any("partial metrics" in r for r in refused["reasons"])
    assert any("gsm8k/tool" in r and "missing metrics" in r for r in refused["reasons"])
    assert registry.get_by_alias(settings, NAME, "champion") is None
