"""The one ``main(argv)`` shape every Spark job shares, so each is runnable with spark-submit::

    spark-submit --jars ... spark_jobs/clean.py --config my.yaml --run-id clean-2026...

A job module defines ``run(spark, settings, run_id) -> dict`` and ends with
``if __name__ == "__main__": sys.exit(job_main(run, "clean"))``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from typing import Any

from jzlake.cli import run_spark_job
from jzlake.settings import load_settings

StageFn = Callable[..., dict[str, Any]]


def job_main(stage: StageFn, name: str, argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"spark_jobs.{name}")
    parser.add_argument("--config", help="YAML settings file")
    parser.add_argument("--lake-root", help="lake root URI (overrides the config)")
    parser.add_argument("--run-id", help="run id to stamp on rows (default: a new one)")
    args = parser.parse_args(argv)
    overrides = {"lake": {"root": args.lake_root}} if args.lake_root else {}
    summary = run_spark_job(stage, name, load_settings(args.config, overrides=overrides), args.run_id)
    print(json.dumps(summary, sort_keys=True, default=str))
    return 0
