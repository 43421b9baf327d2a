"""GPU job dispatch for Airflow: a job spec, shard markers, and one operator per backend.

A **job spec** (``GpuJobSpec``) says what to run — ``python -m <module> <args>`` — with which
resources (GPUs, CPU, memory), image, environment (plain configuration only; secrets are
*references* to Kubernetes secrets or Airflow connections, never values), and which shard of
how many. The job itself never knows where it runs; it follows the I/O contract of
``models/lake_io.py`` (pinned inputs, staged shard outputs, one MERGE).

``settings.gpu.backend`` picks the operator (``gpu_job_task`` / ``sharded_gpu_job_task``):

* ``local``      → ``GpuJobOperator``: a subprocess on the worker (``plugins/gpu_backends.py``);
* ``kubernetes`` → ``GpuKubernetesPodOperator``: the provider's ``KubernetesPodOperator`` with
  GPU limits, tolerations, node selector, memory-backed ``/dev/shm``, deferrable.

Sharded jobs fan out with dynamic task mapping, ``.partial(...).expand(shard_index=[0..n-1])``.
A finished shard leaves a **completion marker** under ``settings.gpu.markers_dir`` keyed by
job name + run key + shard (``<markers>/<job>/<run key>/shard-00001-of-00004.json``, holding the
job's JSON summary); a rerun or retry of that shard finds it and returns the summary without
running anything. The run key defaults to the Airflow run id (``{{ run_id }}``) — a retry or a
cleared task skips finished shards; a content-addressed key makes new DAG runs skip them too.

    spec = GpuJobSpec(name="influence-score", module="models.influence",
                      args=["--phase", "score", "--run-name", "{{ run_id }}"], num_shards=4,
                      secrets=[SecretRef(env="OPENAI_API_KEY", k8s_secret="llm", k8s_key="openai")])
    scores = sharded_gpu_job_task("score", spec, settings)      # 4 mapped task instances
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from airflow.sdk import BaseOperator
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from jzlake.settings import Settings
from jzlake.uris import arrow_filesystem
from plugins.assets import pinned_arguments, record_outlet_versions
from plugins.gpu_backends import kubernetes_pod_kwargs, run_local

if TYPE_CHECKING:
    from airflow.sdk import Context

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# An environment variable with one of these names is a secret: pass it as a SecretRef instead.
_SECRET_NAME = re.compile(r"(^|_)(API_KEY|KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIALS?)$", re.IGNORECASE)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SecretRef(_Model):
    """A secret the job receives as environment variable ``env``, by reference only.

    ``k8s_secret``/``k8s_key``: a Kubernetes secret (the pod gets a ``secretKeyRef``; the local
    backend reads the worker's own ``env`` variable). ``airflow_conn_id``: an Airflow
    connection's ``conn_field``, resolved on the worker by the local backend only.
    """

    env: str
    k8s_secret: str | None = None
    k8s_key: str | None = None
    airflow_conn_id: str | None = None
    conn_field: Literal["password", "login", "host", "extra", "uri"] = "password"

    @model_validator(mode="after")
    def _one_source(self) -> SecretRef:
        if (self.k8s_secret is None) == (self.airflow_conn_id is None):
            raise ValueError(f"secret {self.env}: set exactly one of k8s_secret or airflow_conn_id")
        return self


class Resources(_Model):
    gpus: int = 1
    cpu: str = "4"
    memory: str = "32Gi"


class GpuJobSpec(_Model):
    """What to run, with what, and which shard (see the module docstring)."""

    name: str = Field(pattern=r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$", max_length=50)
    module: str = Field(pattern=r"^[A-Za-z_][\w.]*$")
    args: list[str] = Field(default_factory=list)
    resources: Resources = Field(default_factory=Resources)
    image: str | None = None                # default: settings.gpu.image
    env: dict[str, str] = Field(default_factory=dict)
    secrets: list[SecretRef] = Field(default_factory=list)
    num_shards: int = Field(default=1, ge=1)
    shard_index: int | None = None          # set per mapped task instance
    run_key: str = "{{ run_id }}"           # marker key (templated)
    timeout_s: int | None = None            # default: settings.gpu.timeout_s
    # flag -> catalogued table: the flag gets the table version named by the run's triggering asset
    # event (plugins/assets.py), e.g. {"--input-version": "gold.corpus"}; no event, no flag (latest).
    pins: dict[str, str] = Field(default_factory=dict)

    @field_validator("env")
    @classmethod
    def _no_plain_secrets(cls, env: dict[str, str]) -> dict[str, str]:
        leaked = sorted(name for name in env if _SECRET_NAME.search(name))
        if leaked:
            raise ValueError(f"env {leaked} look like secrets; pass them as secrets=[SecretRef(env=..., "
                             "k8s_secret=... | airflow_conn_id=...)] so no value is written into the spec")
        return env

    @model_validator(mode="after")
    def _shard_in_range(self) -> GpuJobSpec:
        if self.shard_index is not None and not 0 <= self.shard_index < self.num_shards:
            raise ValueError(f"job {self.name}: shard_index {self.shard_index} outside 0..{self.num_shards - 1}")
        return self

    @property
    def sharded(self) -> bool:
        return self.num_shards > 1 or self.shard_index is not None

    def for_shard(self, shard_index: int | None) -> GpuJobSpec:
        return self if shard_index is None else self.model_copy(update={"shard_index": shard_index})

    def pinned(self, context: Any, settings: Settings) -> GpuJobSpec:
        """This spec with ``pins`` resolved from the DAG run's triggering asset events."""
        extra = pinned_arguments(self.pins, context, settings) if self.pins else []
        return self.model_copy(update={"args": [*self.args, *extra]}) if extra else self

    def arguments(self) -> list[str]:
        """The job's arguments, with ``--shard-index i --num-shards n`` for a sharded job."""
        if not self.sharded:
            return list(self.args)
        return [*self.args, "--shard-index", str(self.shard_index or 0), "--num-shards", str(self.num_shards)]

    def command(self, python: str = "python") -> list[str]:
        return [python, "-m", self.module, *self.arguments()]


# ---- completion markers -------------------------------------------------------------------------

def _safe(key: str) -> str:
    """A run key as one path segment (Airflow run ids hold ``:`` and ``+``), still recognisable."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("_")[:80]
    return f"{cleaned}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


class ShardMarkers:
    """Completion markers under ``root`` (a local folder or an object-store URI)."""

    def __init__(self, root: str) -> None:
        self.root = root.rstrip("/")

    def path(self, spec: GpuJobSpec) -> str:
        shard = spec.shard_index or 0
        return f"{self.root}/{spec.name}/{_safe(spec.run_key)}/shard-{shard:05d}-of-{spec.num_shards:05d}.json"

    def _fs(self, path: str) -> tuple[Any, str]:
        return arrow_filesystem(path)

    def read(self, spec: GpuJobSpec) -> dict[str, Any] | None:
        """The marker of ``spec``'s shard, or ``None`` when the shard has not finished."""
        from pyarrow import fs

        filesystem, path = self._fs(self.path(spec))
        if filesystem.get_file_info(path).type != fs.FileType.File:
            return None
        with filesystem.open_input_stream(path) as stream:
            return json.loads(stream.read().decode())

    def write(self, spec: GpuJobSpec, summary: dict[str, Any] | None, seconds: float | None = None) -> str:
        filesystem, path = self._fs(self.path(spec))
        filesystem.create_dir(path.rsplit("/", 1)[0], recursive=True)
        body = {"job": spec.name, "module": spec.module, "run_key": spec.run_key, "shard_index": spec.shard_index,
                "num_shards": spec.num_shards, "seconds": seconds, "summary": summary}
        tmp = f"{path}.tmp-{os.getpid()}"
        with filesystem.open_output_stream(tmp) as stream:
            stream.write(json.dumps(body, sort_keys=True, default=str).encode())
        filesystem.move(tmp, path)
        return path


def markers_for(settings: Settings) -> ShardMarkers:
    return ShardMarkers(settings.path(settings.gpu.markers_dir))


def _resolve_settings(settings: Settings | None) -> Settings:
    if settings is not None:
        return settings
    from plugins.dag_settings import dag_settings

    return dag_settings()


# ---- local backend ------------------------------------------------------------------------------

class GpuJobOperator(BaseOperator):
    """Runs a ``GpuJobSpec`` as a subprocess on the worker (``settings.gpu.backend: local``).

    Returns the job's JSON summary (last stdout line) as XCom; a shard with a completion marker
    is skipped and returns the summary recorded in the marker.
    """

    template_fields: Sequence[str] = ("spec",)
    ui_color = "#d6eaf8"

    def __init__(self, *, spec: dict[str, Any], shard_index: int | None = None,
                 settings: Settings | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.spec = spec
        self.shard_index = shard_index
        self._settings = settings
        self._proc: Any = None

    def job_spec(self) -> GpuJobSpec:
        return GpuJobSpec.model_validate(self.spec).for_shard(self.shard_index)

    def job_env(self, spec: GpuJobSpec) -> dict[str, str]:
        """Worker environment + the spec's plain env + resolved secret references (never logged)."""
        env = {**os.environ, **spec.env}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
        for ref in spec.secrets:
            if ref.airflow_conn_id:
                from airflow.sdk import BaseHook

                conn = BaseHook.get_connection(ref.airflow_conn_id)
                value = conn.get_uri() if ref.conn_field == "uri" else getattr(conn, ref.conn_field)
            else:
                value = os.environ.get(ref.env)
            if not value:
                raise RuntimeError(f"job {spec.name}: secret {ref.env} is empty: define Airflow connection "
                                   f"{ref.airflow_conn_id!r}" if ref.airflow_conn_id else
                                   f"job {spec.name}: secret {ref.env} (k8s secret {ref.k8s_secret}) is not set "
                                   "in the worker's environment, which the local backend reads instead")
            env[ref.env] = str(value)
        return env

    def execute(self, context: Context) -> dict[str, Any] | None:
        settings = _resolve_settings(self._settings)
        spec = self.job_spec().pinned(context, settings)
        markers = markers_for(settings)
        done = markers.read(spec)
        if done is not None:
            self.log.info("shard %s/%s of %s already finished (marker %s): skipping",
                          spec.shard_index or 0, spec.num_shards, spec.name, markers.path(spec))
            record_outlet_versions(context, self.outlets, done.get("summary"), warn=self.log.warning, job=spec.name)
            return done.get("summary")
        command = spec.command(settings.gpu.python or sys.executable)
        self.log.info("running %s (secrets by reference: %s)", " ".join(command), [r.env for r in spec.secrets])
        result = run_local(command, env=self.job_env(spec), cwd=REPO,
                           timeout_s=spec.timeout_s or settings.gpu.timeout_s, kill_grace_s=settings.gpu.kill_grace_s,
                           tail_lines=settings.gpu.log_tail_lines, log=self.log.info,
                           on_start=lambda proc: setattr(self, "_proc", proc))
        path = markers.write(spec, result.summary, result.seconds)
        self.log.info("shard finished in %.1fs; marker %s", result.seconds, path)
        record_outlet_versions(context, self.outlets, result.summary, warn=self.log.warning, job=spec.name)
        return result.summary

    def on_kill(self) -> None:
        from plugins.gpu_backends import kill_process_group

        if self._proc is not None and self._proc.poll() is None:
            settings = _resolve_settings(self._settings)
            kill_process_group(self._proc.pid, settings.gpu.kill_grace_s)


# ---- kubernetes backend -------------------------------------------------------------------------

class GpuKubernetesPodOperator(KubernetesPodOperator):
    """The provider's ``KubernetesPodOperator`` for one shard of a ``GpuJobSpec`` (plus markers)."""

    template_fields: Sequence[str] = (*KubernetesPodOperator.template_fields, "gpu_run_key")

    def __init__(self, *, spec: dict[str, Any], shard_index: int | None = None,
                 settings: Settings | None = None, **kwargs: Any) -> None:
        self._gpu_settings = _resolve_settings(settings)
        self.gpu_spec = GpuJobSpec.model_validate(spec).for_shard(shard_index)
        self.gpu_run_key = self.gpu_spec.run_key
        super().__init__(**{**kubernetes_pod_kwargs(self.gpu_spec, self._gpu_settings), **kwargs})

    def _rendered_spec(self) -> GpuJobSpec:
        return self.gpu_spec.model_copy(update={"run_key": self.gpu_run_key})

    def execute(self, context: Context) -> Any:
        markers = markers_for(self._gpu_settings)
        done = markers.read(self._rendered_spec())
        if done is not None:
            self.log.info("shard already finished (marker %s): skipping", markers.path(self._rendered_spec()))
            return done.get("summary")
        pins = pinned_arguments(self.gpu_spec.pins, context, self._gpu_settings) if self.gpu_spec.pins else []
        self.arguments = [*(self.arguments or []), *pins]
        result = super().execute(context)
        if not self.deferrable:
            markers.write(self._rendered_spec(), result if isinstance(result, dict) else None)
            record_outlet_versions(context, self.outlets, result if isinstance(result, dict) else None,
                                   warn=self.log.warning, job=self.gpu_spec.name)
        return result

    def trigger_reentry(self, context: Context, event: dict[str, Any]) -> Any:
        result = super().trigger_reentry(context, event)  # raises when the pod failed
        markers_for(self._gpu_settings).write(self._rendered_spec(), result if isinstance(result, dict) else None)
        record_outlet_versions(context, self.outlets, result if isinstance(result, dict) else None,
                               warn=self.log.warning, job=self.gpu_spec.name)
        return result


# ---- factories for DAG files --------------------------------------------------------------------

def operator_class(settings: Settings) -> type[BaseOperator]:
    return GpuKubernetesPodOperator if settings.gpu.backend == "kubernetes" else GpuJobOperator


def gpu_job_task(task_id: str, spec: GpuJobSpec, settings: Settings, **kwargs: Any) -> BaseOperator:
    """One (unsharded) GPU job task on the configured backend."""
    return operator_class(settings)(task_id=task_id, spec=spec.model_dump(), **kwargs)


def sharded_gpu_job_task(task_id: str, spec: GpuJobSpec, settings: Settings, **kwargs: Any) -> Any:
    """``spec.num_shards`` mapped task instances (dynamic task mapping over ``shard_index``)."""
    return operator_class(settings).partial(task_id=task_id, spec=spec.model_dump(), **kwargs).expand(
        shard_index=list(range(spec.num_shards)))
