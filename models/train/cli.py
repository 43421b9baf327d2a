"""``jzlake train synthesizer|jiuzhang`` and ``python -m models.train.<job>``: the training jobs.

    jzlake train synthesizer                         # gold.kd_dataset (latest) → jiuzhang-synthesizer@challenger
    jzlake train synthesizer --input-version 3 --method lora --epochs 2
    jzlake train jiuzhang --no-register              # train and save only
    accelerate launch --config_file infra/accelerate/fsdp.yaml -m models.train.jiuzhang   # multi-GPU

Flags override ``train.<job>`` settings (recipe flags apply to the recipe of the device used).
``--stop-after-step K`` stops after step K with a checkpoint (a simulated preemption; rerun the
same command to resume). The last stdout line is the JSON summary: model name, version, alias,
run id, tokens trained, first/last loss, seconds.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

from jzlake.settings import Settings, deep_merge
from models.train.job import JobOptions

JOBS = ("synthesizer", "jiuzhang")
# flag destination -> recipe field (applied to both the gpu and the cpu recipe)
RECIPE_FLAGS = {"base_model": "base_model", "method": "method", "epochs": "epochs", "learning_rate": "learning_rate",
                "max_length": "max_length", "global_batch_size": "global_batch_size",
                "micro_batch_size": "micro_batch_size", "packing": "packing"}
JOB_FLAGS = {"input_version": "input_version", "device": "device", "seed": "seed", "register": "register_version",
             "checkpoint_every": "checkpoint_every", "torch_threads": "torch_threads", "format_seed": "format_seed"}


def add_job_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input-version", type=int, help="pin the input table's Delta version (default: latest)")
    parser.add_argument("--device", help="cpu, cuda or auto (picks the gpu or cpu recipe)")
    parser.add_argument("--base-model", help="HF model directory or models:/ URI (default: per recipe)")
    parser.add_argument("--method", choices=("full", "lora"))
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--learning-rate", type=float, help="peak learning rate of the WSD schedule")
    parser.add_argument("--max-length", type=int)
    parser.add_argument("--global-batch-size", type=int)
    parser.add_argument("--micro-batch-size", type=int)
    parser.add_argument("--no-packing", dest="packing", action="store_false", default=None)
    parser.add_argument("--checkpoint-every", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--torch-threads", type=int)
    parser.add_argument("--no-register", dest="register", action="store_false", default=None,
                        help="train and save only; register nothing in MLflow")
    parser.add_argument("--format-seed", dest="format_seed", action=argparse.BooleanOptionalAction, default=None,
                        help="synthesizer: add the GSM8K format seed (default: settings)")
    parser.add_argument("--stop-after-step", type=int, help="stop after this step with a checkpoint (preemption test)")


def configure(parser: argparse.ArgumentParser) -> None:
    """``jzlake train``'s flags (``jzlake`` adds ``--config`` and ``--lake-root``)."""
    parser.add_argument("job", choices=JOBS, help="which model to train")
    add_job_flags(parser)


def apply_flags(settings: Settings, job: str, args: argparse.Namespace) -> Settings:
    """Settings with the given flags written into ``train.<job>``."""
    section: dict[str, Any] = {}
    recipe = {field: getattr(args, flag) for flag, field in RECIPE_FLAGS.items()
              if getattr(args, flag, None) is not None}
    base = recipe.get("base_model")
    if base and not base.startswith(("models:/", "runs:/")):
        from jzlake.cli import cli_path

        recipe["base_model"] = cli_path(base)  # a directory typed on the command line: from the caller's cwd
    if recipe:
        section.update(gpu=recipe, cpu=recipe)
    for flag, field in JOB_FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            if field == "format_seed" and job != "synthesizer":
                raise SystemExit("--format-seed applies to `train synthesizer` only")
            section[field] = value
    if not section:
        return settings
    return Settings.model_validate(deep_merge(settings.model_dump(), {"train": {job: section}}))


def run_job(job: str, settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    from models.train import jiuzhang, synthesizer

    module = synthesizer if job == "synthesizer" else jiuzhang
    options = JobOptions(stop_after_step=getattr(args, "stop_after_step", None))
    return module.run(apply_flags(settings, job, args), options)


def run(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    """Entry point for ``jzlake train``."""
    return run_job(args.job, settings, args)


def run_job_main(job: str, argv: Sequence[str] | None = None) -> int:
    """``python -m models.train.<job>`` (also under ``accelerate launch``): the JSON summary last."""
    from jzlake.cli import settings_from_args

    parser = argparse.ArgumentParser(prog=f"python -m models.train.{job}", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML settings file (default: packaged defaults)")
    parser.add_argument("--lake-root", help="lake root URI or path (overrides the config)")
    add_job_flags(parser)
    args = parser.parse_args(argv)
    summary = run_job(job, settings_from_args(args), args)
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(json.dumps(summary, sort_keys=True, default=str))
    return 0
