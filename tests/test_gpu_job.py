"""GPU job dispatch: the spec, the Kubernetes pod request, and the local backend running a real
sharded job (markers skip finished shards; failures and timeouts surface and clean up)."""

from __future__ import annotations

import json
import os
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from tests.airflow_env import airflow_template, isolate_airflow_home  # noqa: F401
from tests.conftest import REPO, make_settings

isolate_airflow_home()

from models import lake_io  # noqa: E402
from plugins.gpu_backends import JobFailed, JobTimeout  # noqa: E402
from plugins.gpu_job import (  # noqa: E402
    GpuJobOperator,
    GpuJobSpec,
    GpuKubernetesPodOperator,
    SecretRef,
    markers_for,
)

FIXTURE = "tests.gpu_job_fixture"


def write_corpus(settings: Any, n: int = 12) -> int:
    rows = [{"doc_id": f"doc-{i:03d}", "source": "test", "text": " ".join(["word"] * (i + 1)), "run_id": "t"}
            for i in range(n)]
    return lake_io.merge_rows(settings, "gold.corpus", rows)["version"]


def fixture_spec(tmp_path: Path, settings: Any, mode: str = "ok", **kw: Any) -> GpuJobSpec:
    return GpuJobSpec(name="fixture", module=FIXTURE, args=["--mode", mode, "--out", str(tmp_path / "out")],
                      env={"JZLAKE__LAKE__ROOT": settings.lake_root}, run_key="run-1", **kw)


def invocations(tmp_path: Path) -> list[str]:
    path = tmp_path / "out" / "invocations.log"
    return path.read_text().splitlines() if path.exists() else []


# ---- spec ---------------------------------------------------------------------------------------

def test_spec_rejects_plain_secrets_and_builds_shard_arguments() -> None:
    with pytest.raises(ValueError, match="look like secrets"):
        GpuJobSpec(name="x", module="m", env={"OPENAI_API_KEY": "sk-123"})
    with pytest.raises(ValueError, match="exactly one"):
        SecretRef(env="HF_TOKEN")
    with pytest.raises(ValueError, match="outside"):
        GpuJobSpec(name="x", module="m", num_shards=2, shard_index=2)
    spec = GpuJobSpec(name="x", module="models.influence", args=["--phase", "score"], num_shards=4)
    assert spec.for_shard(3).command("py") == ["py", "-m", "models.influence", "--phase", "score",
                                               "--shard-index", "3", "--num-shards", "4"]
    assert GpuJobSpec(name="x", module="m", args=["a"]).arguments() == ["a"]  # unsharded: no shard flags


# ---- kubernetes ---------------------------------------------------------------------------------

def test_kubernetes_pod_request_for_one_gpu_shard(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, gpu={"backend": "kubernetes", "image": "registry.example/jz-gpu:1.2",
                                            "namespace": "ml", "kubernetes": {"shm_size": "8Gi"}})
    spec = GpuJobSpec(name="influence-score", module="models.influence", args=["--phase", "score"],
                      num_shards=4, env={"JZLAKE__LAKE__ROOT": "s3://bucket/lake"},
                      resources={"gpus": 2, "cpu": "8", "memory": "64Gi"},
                      secrets=[SecretRef(env="OPENAI_API_KEY", k8s_secret="llm-keys", k8s_key="openai")])
    op = GpuKubernetesPodOperator(task_id="score", spec=spec.model_dump(), shard_index=2, settings=settings)
    pod = op.build_pod_request_obj(dry_run=True)

    assert op.deferrable is True
    assert pod.metadata.namespace == "ml" and pod.metadata.labels["jzlake/shard"] == "2"
    (container,) = pod.spec.containers
    assert container.image == "registry.example/jz-gpu:1.2"
    assert container.command == ["python", "-m", "models.influence"]
    assert container.args == ["--phase", "score", "--shard-index", "2", "--num-shards", "4"]
    assert container.resources.limits == {"cpu": "8", "memory": "64Gi", "nvidia.com/gpu": "2"}
    assert container.resources.requests["nvidia.com/gpu"] == "2"
    env = {e.name: e for e in container.env}
    assert env["JZLAKE__LAKE__ROOT"].value == "s3://bucket/lake"
    secret = env["OPENAI_API_KEY"]
    assert secret.value is None
    assert (secret.value_from.secret_key_ref.name, secret.value_from.secret_key_ref.key) == ("llm-keys", "openai")
    assert "sk-" not in json.dumps(pod.to_dict(), default=str)
    volumes = {v.name: v for v in pod.spec.volumes}
    assert volumes["dshm"].empty_dir.medium == "Memory" and volumes["dshm"].empty_dir.size_limit == "8Gi"
    assert {m.name: m.mount_path for m in container.volume_mounts}["dshm"] == "/dev/shm"
    assert [(t.key, t.operator, t.effect) for t in pod.spec.tolerations] == [("nvidia.com/gpu", "Exists", "NoSchedule")]
    assert pod.spec.node_selector == {"nvidia.com/gpu.present": "true"}
    assert pod.spec.restart_policy == "Never" and pod.spec.active_deadline_seconds == settings.gpu.timeout_s


def test_kubernetes_refuses_airflow_connection_secrets(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, gpu={"backend": "kubernetes"})
    spec = GpuJobSpec(name="x", module="m", secrets=[SecretRef(env="OPENAI_API_KEY", airflow_conn_id="openai")])
    with pytest.raises(ValueError, match="Kubernetes secret"):
        GpuKubernetesPodOperator(task_id="x", spec=spec.model_dump(), settings=settings)


# ---- local backend ------------------------------------------------------------------------------

def test_local_backend_runs_sharded_job_and_skips_finished_shards(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, gpu={"markers_dir": str(tmp_path / "markers")})
    version = write_corpus(settings)
    spec = fixture_spec(tmp_path, settings, num_shards=2)

    results = [GpuJobOperator(task_id="score", spec=spec.model_dump(), shard_index=i, settings=settings).execute({})
               for i in range(2)]
    assert [r["shard_index"] for r in results] == [0, 1]
    assert sum(r["rows"] for r in results) == 12 and {r["input_version"] for r in results} == {version}
    assert invocations(tmp_path) == ["ok 0/2", "ok 1/2"]
    marker = markers_for(settings).read(spec.for_shard(1))
    assert marker["summary"] == results[1] and marker["run_key"] == "run-1"

    # A retry of shard 1 (same run key) finds its marker: nothing runs, the summary comes back.
    retried = GpuJobOperator(task_id="score", spec=spec.model_dump(), shard_index=1, settings=settings).execute({})
    assert retried == results[1]
    assert invocations(tmp_path) == ["ok 0/2", "ok 1/2"]

    # The staged shards commit once; committing again changes nothing (same version).
    first = lake_io.commit_staged(settings, "gold.influence_scores", "fixture-run", num_shards=2)
    assert first["inserted"] == 12 and first["committed"]
    again = lake_io.commit_staged(settings, "gold.influence_scores", "fixture-run", num_shards=2)
    assert not again["committed"] and again["version"] == first["version"]


def test_local_backend_propagates_failure_with_stderr_tail(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, gpu={"markers_dir": str(tmp_path / "markers")})
    spec = fixture_spec(tmp_path, settings, mode="fail")
    op = GpuJobOperator(task_id="fail", spec=spec.model_dump(), settings=settings)
    with pytest.raises(JobFailed, match="exited with code 3") as info:
        op.execute({})
    assert "corrupted checkpoint shard 7" in str(info.value)
    assert markers_for(settings).read(spec) is None  # a failed shard leaves no marker: the retry reruns it


def test_local_backend_timeout_kills_the_process_group(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, gpu={"markers_dir": str(tmp_path / "markers"), "kill_grace_s": 2})
    spec = fixture_spec(tmp_path, settings, mode="hang", timeout_s=4)
    op = GpuJobOperator(task_id="hang", spec=spec.model_dump(), settings=settings)
    started = time.monotonic()
    with pytest.raises(JobTimeout, match="timeout"):
        op.execute({})
    assert time.monotonic() - started < 30
    child = json.loads((tmp_path / "out" / "pids.json").read_text())["child"]
    for pid in (op._proc.pid, child):
        assert not _alive(pid), f"process {pid} survived the timeout"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead but not yet reaped (the job's child belongs to the killed job): check its state.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


# ---- the DAG ------------------------------------------------------------------------------------

def test_influence_dag_maps_score_shards_over_the_gpu_operator(monkeypatch: pytest.MonkeyPatch) -> None:
    import runpy

    from airflow.serialization.serialized_objects import DagSerialization

    monkeypatch.setenv("JZLAKE__INFLUENCE__NUM_SHARDS", "3")
    from plugins.dag_settings import dag_settings

    dag_settings.cache_clear()
    try:
        dag = runpy.run_path(str(REPO / "dags" / "influence_selection.py"))["dag"]
    finally:
        dag_settings.cache_clear()
    assert sorted(dag.task_ids) == ["commit_select", "prepare", "score"]
    score = dag.task_dict["score"]
    assert score.operator_class is GpuJobOperator
    assert score.expand_input.value == {"shard_index": [0, 1, 2]}
    assert score.upstream_task_ids == {"prepare"} and dag.task_dict["commit_select"].upstream_task_ids == {"score"}
    assert {a.name for a in dag.task_dict["commit_select"].outlets} == {
        "lake.gold.influence_scores", "lake.gold.selected_texts"}
    assert "--num-shards" in dag.task_dict["commit_select"].spec["args"]
    DagSerialization.to_dict(dag)  # what the dag-processor stores must serialise


@pytest.mark.airflow
@pytest.mark.slow
def test_dag_test_fans_out_mapped_shards(tmp_path: Path, airflow_template: Path) -> None:  # noqa: F811
    """A real Airflow run (dag.test): the mapped operator fans out over shard indices."""
    from plugins.airflow_local import dag_test_subprocess
    from tests.airflow_env import airflow_test_env, tail

    settings = make_settings(tmp_path)
    write_corpus(settings)
    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / "sharded_fixture.py").write_text(textwrap.dedent(f"""
        import pendulum
        from airflow.sdk import DAG
        from jzlake.settings import load_settings
        from plugins.gpu_job import GpuJobSpec, sharded_gpu_job_task

        settings = load_settings()
        with DAG("sharded_fixture", schedule=None, start_date=pendulum.datetime(2026, 1, 1), catchup=False) as dag:
            sharded_gpu_job_task("score", GpuJobSpec(
                name="fixture", module="{FIXTURE}", args=["--out", {str(tmp_path / "out")!r}], num_shards=3,
                run_key="fixed-key", env={{"JZLAKE__LAKE__ROOT": {settings.lake_root!r}}}), settings)
    """))
    env = airflow_test_env(airflow_template, tmp_path, port=18249, lake_dir=tmp_path,
                           AIRFLOW__CORE__DAGS_FOLDER=str(dags),
                           JZLAKE__GPU__MARKERS_DIR=str(tmp_path / "markers"))
    log = tmp_path / "dag_test.log"
    result = dag_test_subprocess(env, "sharded_fixture", tmp_path / "result.json", timeout_s=600, log_file=log)
    assert result["state"] == "success", f"{result}\n{tail(log, 80)}"
    # Three mapped task instances, one per shard, each ran its shard once and left a marker.
    assert sorted(invocations(tmp_path)) == ["ok 0/3", "ok 1/3", "ok 2/3"]
    marker_settings = make_settings(tmp_path, gpu={"markers_dir": str(tmp_path / "markers")})
    spec = GpuJobSpec(name="fixture", module=FIXTURE, num_shards=3, run_key="fixed-key")
    assert all(markers_for(marker_settings).read(spec.for_shard(i)) for i in range(3))
    rows = lake_io.read_staged(settings, "gold.influence_scores", "fixture-run", num_shards=3)
    assert rows.num_rows == 12
