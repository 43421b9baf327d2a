"""Backends that run a GPU job spec (``plugins/gpu_job.py``): the I/O half of the operator.

* ``local``: ``python -m <module> <args>`` as a subprocess of the worker, in its own process
  group. stdout/stderr are streamed line by line into the task log as they arrive; the exit code
  is propagated (non-zero → ``JobFailed`` quoting the tail of stderr); past the timeout the whole
  process group (the job and anything it spawned: data-loader workers, a vLLM engine) gets
  SIGTERM, then SIGKILL after a grace period. The last stdout line, if it is a JSON object, is
  the job's summary (the task's XCom).
* ``kubernetes``: ``kubernetes_pod_kwargs`` turns a spec into the cncf.kubernetes provider's
  ``KubernetesPodOperator`` arguments: ``nvidia.com/gpu`` limits, GPU tolerations and node
  selector, a memory-backed ``/dev/shm``, secrets only as ``secretKeyRef``s, deferrable.

Nothing here imports Airflow at module import time except for type checking.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jzlake.settings import Settings
    from plugins.gpu_job import GpuJobSpec


class JobFailed(RuntimeError):
    """The job exited non-zero (message: command, exit code, stderr tail)."""


class JobTimeout(JobFailed):
    """The job ran past its timeout; its process group was killed."""


@dataclass
class LocalRun:
    returncode: int
    seconds: float
    summary: dict[str, Any] | None
    stdout_tail: list[str] = field(default_factory=list)
    stderr_tail: list[str] = field(default_factory=list)


def kill_process_group(pid: int, grace_s: float) -> None:
    """SIGTERM the process group led by ``pid``, then SIGKILL whatever is left after ``grace_s``."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def _pump(stream: Any, tail: collections.deque, emit: Callable[[str], None]) -> None:
    for line in iter(stream.readline, ""):
        line = line.rstrip("\n")
        tail.append(line)
        emit(line)
    stream.close()


def _summary(lines: Sequence[str]) -> dict[str, Any] | None:
    for line in reversed(lines):
        if line.strip():
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                return None
            return value if isinstance(value, dict) else None
    return None


def run_local(command: Sequence[str], *, env: Mapping[str, str], cwd: str | None = None,
              timeout_s: float | None = None, kill_grace_s: float = 20.0, tail_lines: int = 40,
              log: Callable[[str], None] = print, on_start: Callable[[subprocess.Popen], None] | None = None
              ) -> LocalRun:
    """Run ``command`` in a new process group, streaming its output to ``log`` line by line."""
    started = time.monotonic()
    proc = subprocess.Popen(list(command), stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            env=dict(env), cwd=cwd, text=True, encoding="utf-8", errors="replace", bufsize=1,
                            start_new_session=True)  # own process group: the timeout kills all of it
    if on_start is not None:
        on_start(proc)
    stdout_tail: collections.deque = collections.deque(maxlen=max(tail_lines, 1))
    stderr_tail: collections.deque = collections.deque(maxlen=max(tail_lines, 1))
    pumps = [threading.Thread(target=_pump, args=(proc.stdout, stdout_tail, log), daemon=True),
             threading.Thread(target=_pump, args=(proc.stderr, stderr_tail, lambda s: log(f"[stderr] {s}")),
                              daemon=True)]
    for pump in pumps:
        pump.start()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill_process_group(proc.pid, kill_grace_s)
        proc.wait()
        for pump in pumps:
            pump.join(timeout=5)
        raise JobTimeout(
            f"job `{' '.join(command)}` ran past its {timeout_s:g}s timeout; its process group {proc.pid} was "
            f"killed. Raise the spec's timeout_s (or settings.gpu.timeout_s) or shard it further. Last stderr "
            f"lines:\n" + "\n".join(stderr_tail)) from None
    except BaseException:
        kill_process_group(proc.pid, kill_grace_s)  # the task itself is being stopped
        raise
    for pump in pumps:
        pump.join()
    result = LocalRun(proc.returncode, time.monotonic() - started, _summary(stdout_tail), list(stdout_tail),
                      list(stderr_tail))
    if proc.returncode != 0:
        raise JobFailed(f"job `{' '.join(command)}` exited with code {proc.returncode} after "
                        f"{result.seconds:.1f}s. Last stderr lines:\n" + "\n".join(stderr_tail))
    return result


# ---- kubernetes ---------------------------------------------------------------------------------

def kubernetes_pod_kwargs(spec: GpuJobSpec, settings: Settings) -> dict[str, Any]:
    """``KubernetesPodOperator`` keyword arguments for one shard of ``spec``."""
    from airflow.providers.cncf.kubernetes.secret import Secret
    from kubernetes.client import models as k8s

    kube = settings.gpu.kubernetes
    quantities = {"cpu": spec.resources.cpu, "memory": spec.resources.memory}
    if spec.resources.gpus:
        quantities[kube.gpu_resource] = str(spec.resources.gpus)  # extended resources: requests == limits
    volumes = [k8s.V1Volume(name="dshm", empty_dir=k8s.V1EmptyDirVolumeSource(medium="Memory",
                                                                              size_limit=kube.shm_size))]
    mounts = [k8s.V1VolumeMount(name="dshm", mount_path="/dev/shm")]
    if kube.shared_volume_claim:  # local-path lakes/run folders: the same path inside the pod
        volumes.append(k8s.V1Volume(name="lake", persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(
            claim_name=kube.shared_volume_claim)))
        mounts.append(k8s.V1VolumeMount(name="lake", mount_path=settings.home))
    secrets = []
    for ref in spec.secrets:
        if ref.k8s_secret is None:
            raise ValueError(f"job {spec.name}: secret {ref.env} refers to Airflow connection {ref.airflow_conn_id!r}, "
                             "which a pod cannot read without putting the value in its spec; store it as a "
                             "Kubernetes secret and reference it with k8s_secret/k8s_key")
        secrets.append(Secret("env", ref.env, ref.k8s_secret, ref.k8s_key or ref.env))
    shard = spec.shard_index if spec.shard_index is not None else 0
    return {
        "image": spec.image or settings.gpu.image,
        "cmds": ["python", "-m", spec.module],
        "arguments": spec.arguments(),
        "namespace": settings.gpu.namespace,
        "name": f"{spec.name}-{shard}",
        "labels": {"app.kubernetes.io/part-of": "jiuzhang-lake", "jzlake/job": spec.name,
                   "jzlake/shard": str(shard), "jzlake/num-shards": str(spec.num_shards)},
        "container_resources": k8s.V1ResourceRequirements(limits=dict(quantities), requests=dict(quantities)),
        "tolerations": [k8s.V1Toleration(**t) for t in kube.tolerations],
        "node_selector": dict(kube.node_selector),
        "volumes": volumes,
        "volume_mounts": mounts,
        "env_vars": [k8s.V1EnvVar(name=k, value=v) for k, v in sorted(spec.env.items())],
        "secrets": secrets,
        "deferrable": True,
        "kubernetes_conn_id": kube.kubernetes_conn_id,
        "service_account_name": kube.service_account,
        "image_pull_policy": kube.image_pull_policy,
        "startup_timeout_seconds": kube.startup_timeout_s,
        "active_deadline_seconds": spec.timeout_s or settings.gpu.timeout_s,
        "on_finish_action": kube.on_finish_action,
        "get_logs": True,
    }
