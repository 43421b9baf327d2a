"""infra/ checked by maintained validators (nothing is built: no container engine runs on CI).

* Kubernetes manifests (``infra/k8s/*.yaml``, every document): ``kubernetes-validate`` in strict
  mode (the Kubernetes OpenAPI schemas, unknown fields rejected) and deserialised into the
  ``kubernetes`` client's models.
* ``infra/docker/compose.yaml``: the Compose specification's JSON schema as vendored by
  ``check-jsonschema`` (read from the installed package: no network at test time); bind-mount
  sources and build contexts/Dockerfiles exist.
* Dockerfiles: parsed with ``dockerfile-parse``; every ``COPY``/``ADD`` source exists in the repo.
* Spark-on-Kubernetes conf: pod template files it names exist and are copied into the image.
* Helm values: see ``test_helm_values_*`` — the chart's ``values.schema.json`` is not available
  from any registry reachable here, so the values are checked against the chart's documented keys.
"""

from __future__ import annotations

import glob
import json
import re
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO

INFRA = REPO / "infra"
K8S_VERSION = "1.33"  # the oldest Kubernetes minor release we deploy to
MANIFESTS = sorted((INFRA / "k8s").glob("*.yaml"))
DOCKERFILES = sorted((INFRA / "docker").glob("Dockerfile*"))
COMPOSE = INFRA / "docker" / "compose.yaml"
IMAGE_ROOT = "/opt/jiuzhang-lake"  # WORKDIR of every image: the repository root inside it


def k8s_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def k8s_model_name(doc: dict[str, Any]) -> str:
    """``apps/v1`` + ``Deployment`` → ``V1Deployment`` (the client's model class name)."""
    version = doc["apiVersion"].split("/")[-1]
    return f"{version[0].upper()}{version[1:]}{doc['kind']}"


def deserialize(doc: dict[str, Any], model: str) -> Any:
    """``doc`` as the client's ``model`` object (``ApiClient.deserialize`` without an HTTP response)."""
    from kubernetes.client import ApiClient

    class _Response:
        data = json.dumps(doc)

    return ApiClient().deserialize(_Response(), model)


# ---- Kubernetes -----------------------------------------------------------------------------------

def test_infra_has_the_manifests_we_ship() -> None:
    names = {p.name for p in MANIFESTS}
    assert {"gpu-job-pod.yaml", "mlflow.yaml", "spark-executor-pod-template.yaml",
            "spark-driver-pod-template.yaml", "spark-rbac.yaml"} <= names, names


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_k8s_manifest_validates_strictly(path: Path) -> None:
    import kubernetes_validate

    docs = k8s_documents(path)
    assert docs, f"{path} holds no documents"
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{path.name}: {doc.get('kind')} {doc.get('metadata', {}).get('name')}: {exc.message} "
                        f"at {'/'.join(map(str, exc.caught.absolute_path))}")
        obj = deserialize(doc, k8s_model_name(doc))
        assert obj.kind == doc["kind"] and obj.api_version == doc["apiVersion"]


def test_strict_validation_rejects_a_misspelt_field() -> None:
    """The validator is strict: a typo in a pod spec (``tolerations`` → ``toleration``) fails."""
    import kubernetes_validate

    doc = k8s_documents(INFRA / "k8s" / "gpu-job-pod.yaml")[0]
    doc["spec"]["toleration"] = doc["spec"].pop("tolerations")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_gpu_pod_requests_a_gpu_and_shared_memory() -> None:
    pod = deserialize(k8s_documents(INFRA / "k8s" / "gpu-job-pod.yaml")[0], "V1Pod")
    job = pod.spec.containers[0]
    assert job.resources.limits["nvidia.com/gpu"] == "1"
    shm = {v.name: v for v in pod.spec.volumes}["dshm"]
    assert shm.empty_dir.medium == "Memory"
    assert any(m.mount_path == "/dev/shm" for m in job.volume_mounts)


def test_mlflow_service_targets_the_deployment() -> None:
    docs = {d["kind"]: d for d in k8s_documents(INFRA / "k8s" / "mlflow.yaml")}
    deployment = deserialize(docs["Deployment"], "V1Deployment")
    service = deserialize(docs["Service"], "V1Service")
    assert deployment.spec.selector.match_labels.items() <= deployment.spec.template.metadata.labels.items()
    assert service.spec.selector.items() <= deployment.spec.template.metadata.labels.items()
    ports = {p.name for c in deployment.spec.template.spec.containers for p in c.ports}
    assert all(p.target_port in ports for p in service.spec.ports)


def spark_k8s_conf() -> dict[str, str]:
    conf = {}
    for line in (INFRA / "k8s" / "spark-on-k8s.conf").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, value = line.split(None, 1)
            conf[key] = value.strip()
    return conf


def test_spark_conf_pod_templates_exist_and_reach_the_image() -> None:
    conf = spark_k8s_conf()
    templates = [v for k, v in conf.items() if k.endswith("podTemplateFile")]
    assert len(templates) == 2
    for template in templates:
        assert template.startswith(IMAGE_ROOT + "/"), template
        relative = template[len(IMAGE_ROOT) + 1:]
        assert (REPO / relative).is_file(), f"spark-on-k8s.conf names {template}: {relative} is not in the repo"
        assert any(relative.startswith(src) for src in copy_sources_of_all()), \
            f"no Dockerfile copies {relative} into {IMAGE_ROOT}"


def test_spark_conf_service_account_is_defined() -> None:
    account = spark_k8s_conf()["spark.kubernetes.authenticate.driver.serviceAccountName"]
    accounts = [d["metadata"]["name"] for d in k8s_documents(INFRA / "k8s" / "spark-rbac.yaml")
                if d["kind"] == "ServiceAccount"]
    assert account in accounts


# ---- Dockerfiles ----------------------------------------------------------------------------------

def parse_dockerfile(path: Path) -> Any:
    """``DockerfileParser`` over ``path`` (given as a file object: ``path=`` takes a folder unless the
    name is exactly ``Dockerfile``)."""
    import io

    from dockerfile_parse import DockerfileParser

    return DockerfileParser(fileobj=io.BytesIO(path.read_bytes()))


def copy_instructions(path: Path) -> list[dict[str, Any]]:
    parser = parse_dockerfile(path)
    return [i for i in parser.structure if i["instruction"] in ("COPY", "ADD")]


def copy_sources(instruction: dict[str, Any]) -> list[str]:
    """Sources of ``COPY [--flags] src... dest`` (shell or JSON form); ``--from`` copies are not files."""
    value = instruction["value"].strip()
    parts = json.loads(value) if value.startswith("[") else value.split()
    flags = [p for p in parts if p.startswith("--")]
    if any(f.startswith("--from") for f in flags):
        return []
    return [p for p in parts if not p.startswith("--")][:-1]


def copy_sources_of_all() -> list[str]:
    return [src.rstrip("/") for path in DOCKERFILES for i in copy_instructions(path) for src in copy_sources(i)]


def test_infra_has_the_three_images() -> None:
    assert {p.name for p in DOCKERFILES} >= {"Dockerfile", "Dockerfile.orchestrator", "Dockerfile.gpu"}


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_parses_and_copies_only_existing_files(path: Path) -> None:
    parser = parse_dockerfile(path)
    assert parser.baseimage, f"{path.name}: no FROM"
    instructions = [i["instruction"] for i in parser.structure if i["instruction"] != "COMMENT"]
    assert instructions[0] in ("FROM", "ARG"), f"{path.name}: first instruction {instructions[0]}"
    copies = copy_instructions(path)
    assert copies, f"{path.name} copies nothing from the repository"
    for instruction in copies:
        for source in copy_sources(instruction):
            matches = glob.glob(str(REPO / source))
            assert matches, (f"{path.name} line {instruction['startline'] + 1}: {instruction['instruction']} "
                             f"source {source!r} does not exist under {REPO} (the build context)")
    workdirs = [i["value"] for i in parser.structure if i["instruction"] == "WORKDIR"]
    assert workdirs == [IMAGE_ROOT], f"{path.name}: WORKDIR {workdirs}, want {IMAGE_ROOT} (conf paths assume it)"


def test_copy_check_catches_a_missing_source(tmp_path: Path) -> None:
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text("FROM python:3.11-slim\nCOPY requirements/lock.txt no/such/dir /x/\n")
    missing = [s for i in copy_instructions(dockerfile) for s in copy_sources(i) if not glob.glob(str(REPO / s))]
    assert missing == ["no/such/dir"]


def test_gpu_image_installs_vllm_and_the_project() -> None:
    text = (INFRA / "docker" / "Dockerfile.gpu").read_text()
    assert "vllm" in text and "requirements/lock.txt" in text and "-e ." in text


def test_spark_entrypoint_handles_executor_pods() -> None:
    """Spark on Kubernetes starts executors with the argument ``executor``; our entrypoint must
    start KubernetesExecutorBackend, a class the pinned pyspark distribution actually ships."""
    import pyspark

    script = (INFRA / "docker" / "spark-entrypoint.sh").read_text()
    assert re.search(r"^\s*executor\)", script, re.M)
    assert "org.apache.spark.scheduler.cluster.k8s.KubernetesExecutorBackend" in script
    jars = Path(pyspark.__file__).parent / "jars"
    assert list(jars.glob("spark-kubernetes_*.jar")), "pyspark ships no spark-kubernetes jar"


# ---- Compose ----------------------------------------------------------------------------------------

def compose_schema() -> dict[str, Any]:
    vendor = resources.files("check_jsonschema.builtin_schemas.vendor")
    return json.loads(vendor.joinpath("compose-spec.json").read_text())


def compose_errors(document: dict[str, Any]) -> list[str]:
    from jsonschema.validators import validator_for

    schema = compose_schema()
    validator = validator_for(schema)(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]


def test_compose_file_follows_the_compose_specification() -> None:
    document = yaml.safe_load(COMPOSE.read_text())
    assert compose_errors(document) == []


def test_compose_schema_check_rejects_an_unknown_service_key() -> None:
    document = yaml.safe_load(COMPOSE.read_text())
    document["services"]["postgres"]["enviroment"] = {"X": "1"}
    assert any("enviroment" in e for e in compose_errors(document))


def test_compose_runs_the_full_stack() -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    for needed in ("postgres", "minio", "spark-master", "spark-worker", "mlflow", "airflow-api-server",
                   "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer"):
        assert needed in services, f"compose.yaml lacks {needed}"


def test_compose_builds_and_mounts_exist() -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    for name, service in services.items():
        build = service.get("build")
        if build:
            context = (COMPOSE.parent / build["context"]).resolve()
            assert context == REPO, f"{name}: build context {context}"
            assert (context / build["dockerfile"]).is_file(), f"{name}: {build['dockerfile']} missing"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0] if isinstance(volume, str) else volume.get("source", "")
            if source.startswith((".", "/")):
                assert (COMPOSE.parent / source).exists(), f"{name}: bind mount {source} missing"


# ---- Helm values ------------------------------------------------------------------------------------
# The official chart (apache-airflow/airflow) is published only in its Helm repository
# (https://airflow.apache.org) and on Artifact Hub — neither is reachable from CI (PyPI, npm,
# Maven Central and Debian only), so its values.schema.json cannot be used here. What we check
# instead: the top-level keys we set are keys the chart documents (values reference, chart 1.18),
# `executor` is one the chart accepts, and the parts that are Kubernetes objects in the chart
# (env entries, extraEnv, resources) validate against the Kubernetes schemas.

CHART_TOP_LEVEL_KEYS = {
    "defaultAirflowRepository", "defaultAirflowTag", "airflowVersion", "images", "executor", "postgresql",
    "data", "webserverSecretKeySecretName", "dags", "env", "extraEnv", "secret", "config", "workers",
    "scheduler", "dagProcessor", "triggerer", "apiServer", "webserver", "redis", "pgbouncer", "ingress",
    "logs", "statsd", "flower", "createUserJob", "migrateDatabaseJob", "nodeSelector", "tolerations",
    "affinity", "labels", "extraSecrets", "extraConfigMaps", "fernetKeySecretName",
}
CHART_EXECUTORS = {"LocalExecutor", "LocalKubernetesExecutor", "CeleryExecutor", "KubernetesExecutor",
                   "CeleryKubernetesExecutor"}
CHART_IMAGE_KEYS = {"repository", "tag", "digest", "pullPolicy"}
CHART_GITSYNC_KEYS = {"enabled", "repo", "branch", "rev", "ref", "depth", "subPath", "period", "wait",
                      "credentialsSecret", "sshKeySecret", "knownHosts", "containerName", "uid", "maxFailures"}


def helm_values() -> dict[str, Any]:
    return yaml.safe_load((INFRA / "helm" / "airflow-values.yaml").read_text())


def test_helm_values_use_documented_chart_keys() -> None:
    values = helm_values()
    assert set(values) <= CHART_TOP_LEVEL_KEYS, set(values) - CHART_TOP_LEVEL_KEYS
    assert values["executor"] in CHART_EXECUTORS
    assert set(values["images"]["airflow"]) <= CHART_IMAGE_KEYS
    assert set(values["dags"]["gitSync"]) <= CHART_GITSYNC_KEYS
    assert all(set(s) == {"envName", "secretName", "secretKey"} for s in values["secret"])
    assert all(isinstance(section, dict) for section in values["config"].values())


def test_helm_values_kubernetes_parts_validate() -> None:
    import kubernetes_validate

    values = helm_values()
    env = values["env"] + yaml.safe_load(values["extraEnv"])
    container = {"name": "probe", "image": "x", "env": env}
    for component in ("workers", "scheduler", "dagProcessor", "apiServer"):
        if "resources" in values.get(component, {}):
            container = {**container, "resources": values[component]["resources"]}
            pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "probe"},
                   "spec": {"containers": [container]}}
            kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    names = [e["name"] for e in env]
    assert len(names) == len(set(names)), f"duplicate env names: {names}"


def test_gpu_pod_the_operator_builds_validates_and_matches_the_reviewed_manifest(tmp_path: Path) -> None:
    """``k8s/gpu-job-pod.yaml`` is shown for review; the pod the operator really sends must pass the
    same strict schema check and agree with it on scheduling and the GPU/shared-memory shape."""
    import kubernetes_validate
    from kubernetes.client import ApiClient

    from plugins.gpu_job import GpuJobSpec, GpuKubernetesPodOperator
    from tests.conftest import make_settings

    settings = make_settings(tmp_path, gpu={"backend": "kubernetes"})
    spec = GpuJobSpec(name="influence-score", module="models.influence", args=["--phase", "score"], num_shards=8)
    built = GpuKubernetesPodOperator(task_id="score", spec=spec.model_dump(), shard_index=0, settings=settings)
    pod = ApiClient().sanitize_for_serialization(built.build_pod_request_obj(dry_run=True))
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)

    reviewed = k8s_documents(INFRA / "k8s" / "gpu-job-pod.yaml")[0]
    assert pod["spec"]["nodeSelector"] == reviewed["spec"]["nodeSelector"]
    assert pod["spec"]["tolerations"] == reviewed["spec"]["tolerations"]
    (container,) = pod["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == reviewed["spec"]["containers"][0]["resources"][
        "limits"]["nvidia.com/gpu"]
    assert {m["mountPath"] for m in container["volumeMounts"]} >= {"/dev/shm"}
    assert container["args"][-4:] == ["--shard-index", "0", "--num-shards", "8"]
