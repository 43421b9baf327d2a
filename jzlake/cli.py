"""``jzlake <stage>``: every stage outside Airflow. Each prints one JSON summary as its last line.

A stage module exposes ``configure(parser)`` (its own flags) and ``run(args, settings) -> dict``.
Each single Spark job (``SPARK_JOBS``) is exposed as is: its ``run(spark, settings, run_id)``
gets a session and a run id. Modules are imported only when their subcommand runs, so
``jzlake --help`` needs no Spark/torch.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from jzlake.settings import Settings, is_uri, load_settings

# subcommand -> (module, one-line help). Later stages add a line here.
COMMANDS: dict[str, tuple[str, str]] = {
    "curate": ("spark_jobs.curate", "ingest → clean → dedupe → decontaminate → report"),
    "tables": ("jzlake.tables", "list every catalogued table with its Delta version and row count"),
    "distil": ("models.distil", "teacher distillation: excerpts → prompts → ledgered LLM calls → gold.kd_dataset"),
    "synthesize": ("models.synthesize", "mass synthesis, sharded and resumable → gold.synthetic_raw"),
    "influence": ("models.influence.cli", "LESS influence scores → gold.influence_scores, gold.selected_texts"),
    "train": ("models.train.cli", "train synthesizer|jiuzhang → MLflow registered model (alias challenger)"),
    "eval": ("models.eval.job", "evaluate a model (CoT + tool settings) → gold.eval_predictions + MLflow metrics"),
    "promote": ("models.eval.promote", "gate NAME@challenger on its metrics; move the champion alias or refuse"),
}

# Single Spark jobs, each also a spark-submit application (spark_jobs/runner.py).
SPARK_JOBS: dict[str, tuple[str, str]] = {
    "ingest": ("spark_jobs.ingest", "raw files → bronze.documents (+ bronze.quarantine)"),
    "clean": ("spark_jobs.clean", "bronze → silver.documents (+ silver.dropped with reasons)"),
    "dedupe": ("spark_jobs.dedupe", "exact + MinHash-LSH near-dedup → silver.dedup, silver.duplicate_clusters"),
    "decontaminate": ("spark_jobs.decontaminate", "benchmark n-gram overlap → gold.corpus, gold.contamination"),
    "report": ("spark_jobs.report", "curation report (HTML + JSON) for a run id"),
    "filter-synthetic": ("spark_jobs.synthetic_filter",
                         "filter, dedupe, decontaminate gold.synthetic_raw → gold.synthetic_problems"),
    "maintain": ("spark_jobs.maintenance", "OPTIMIZE + VACUUM (retention >= 7 days) every table, compact the ledgers"),
}


def run_spark_job(stage: Any, name: str, settings: Settings, run_id: str | None = None) -> dict[str, Any]:
    """Run one Spark job's ``stage(spark, settings, run_id)``; save its summary in the run folder."""
    from jzlake.lineage import new_run_id
    from jzlake.runs import write_stage_summary
    from spark_jobs.session import get_spark

    run_id = run_id or new_run_id(name)
    summary = stage(get_spark(settings, app_name=f"jzlake-{name}"), settings, run_id)
    summary["summary_path"] = write_stage_summary(settings, run_id, name, summary)
    return summary


def cli_path(value: str) -> str:
    """A path typed on the command line, made absolute from the caller's working directory.

    Settings resolve relative paths against ``home`` (the repository): right for the config file
    and the defaults, wrong for ``jzlake curate --lake-root mylake`` typed in another folder.
    URIs are returned unchanged."""
    return value if is_uri(value) else os.path.abspath(os.path.expanduser(value))


def parse_key_values(pairs: Sequence[str] | None, flag: str, paths: bool = False) -> dict[str, str]:
    """``["a=x", "b=y"]`` → ``{"a": "x", "b": "y"}`` with a clear error on a malformed pair;
    ``paths``: values are command-line paths (``cli_path``)."""
    result: dict[str, str] = {}
    for pair in pairs or []:
        name, sep, value = pair.partition("=")
        if not sep or not name or not value:
            raise SystemExit(f"{flag} expects NAME=VALUE, got {pair!r}")
        result[name] = cli_path(value) if paths else value
    return result


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The CLI parser; ``command``'s own flags are added (which imports only that stage)."""
    parser = argparse.ArgumentParser(prog="jzlake", description="JiuZhang Lake: any pipeline stage, outside Airflow.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        cmd.add_argument("--config", help="YAML settings file (default: packaged defaults)")
        cmd.add_argument("--lake-root", help="lake root URI or path (overrides the config)")
        cmd.set_defaults(_module=module)
        if name == command:
            importlib.import_module(module).configure(cmd)
    for name, (module, help_text) in SPARK_JOBS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        cmd.add_argument("--config", help="YAML settings file (default: packaged defaults)")
        cmd.add_argument("--lake-root", help="lake root URI or path (overrides the config)")
        cmd.add_argument("--run-id", help="run id to stamp on rows (default: a new one)")
        cmd.set_defaults(_module=module, _spark_job=name)
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    if getattr(args, "lake_root", None):
        overrides["lake"] = {"root": cli_path(args.lake_root)}
    return load_settings(args.config, overrides=overrides)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in COMMANDS else None
    args = build_parser(command).parse_args(argv)
    module = importlib.import_module(args._module)
    if getattr(args, "_spark_job", None):
        summary = run_spark_job(module.run, args._spark_job, settings_from_args(args), args.run_id)
    else:
        summary = module.run(args, settings_from_args(args))
    print(json.dumps(summary, sort_keys=True, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
