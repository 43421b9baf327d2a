"""GPU job specs for the training jobs, dispatched like the influence job (``plugins/gpu_job.py``).

One GPU: ``python -m models.train.<job> <args>``. Several GPUs on one node: the same module under
``accelerate launch`` with the FSDP config (``infra/accelerate/fsdp.yaml``), i.e.
``python -m accelerate.commands.launch --config_file … --num_processes N -m models.train.<job>``.
Either way the job prints its JSON summary last (rank 0 only), which the local backend returns
as XCom and records in the completion marker; a Kubernetes pod gets ``nvidia.com/gpu: N``.

    spec = train_job_spec("synthesizer", gpus=8, args=["--input-version", "{{ ti.xcom_pull('distil')['version'] }}"])
    train = gpu_job_task("train_synthesizer", spec, settings)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

FSDP_CONFIG = "infra/accelerate/fsdp.yaml"
JOBS = ("synthesizer", "jiuzhang")


def train_job_spec(job: str, *, args: Sequence[str] = (), gpus: int = 1, accelerate_config: str = FSDP_CONFIG,
                   cpu: str = "8", memory: str = "64Gi", env: Mapping[str, str] | None = None,
                   run_key: str = "{{ run_id }}", timeout_s: int | None = None) -> Any:
    """The ``GpuJobSpec`` of one training job (unsharded: a training run is one job)."""
    from plugins.gpu_job import GpuJobSpec, Resources

    if job not in JOBS:
        raise ValueError(f"unknown training job {job!r}; known: {JOBS}")
    module, arguments = f"models.train.{job}", list(args)
    if gpus > 1:
        arguments = ["--config_file", accelerate_config, "--num_processes", str(gpus), "-m", module, *arguments]
        module = "accelerate.commands.launch"
    return GpuJobSpec(name=f"train-{job}", module=module, args=arguments, env=dict(env or {}),
                      resources=Resources(gpus=gpus, cpu=cpu, memory=memory), run_key=run_key, timeout_s=timeout_s)
