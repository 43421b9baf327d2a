"""``jzlake curate``: ingest → clean → dedupe → decontaminate → report in one Spark session.

The same stage functions run as separate spark-submit tasks under Airflow
(``dags/corpus_curation.py``); here they share one JVM, which is what a laptop wants.
The last stdout line is the run summary (see ``summarize``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import TYPE_CHECKING, Any

from jzlake import catalogue
from jzlake.cli import parse_key_values
from jzlake.lineage import new_run_id
from jzlake.runs import write_stage_summary
from jzlake.settings import BenchmarkSettings, Settings, SourceSettings
from jzlake.tables import describe_table

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)

CURATION_TABLES = (
    "bronze.documents", "bronze.quarantine", "bronze.ingested_files", "silver.documents",
    "silver.dropped", "silver.minhash_signatures", "silver.duplicate_edges",
    "silver.duplicate_clusters", "silver.dedup", "gold.contamination", "gold.corpus",
)


def with_cli_inputs(settings: Settings, sources: dict[str, str], benchmarks: dict[str, str]) -> Settings:
    """Apply ``--source``/``--benchmark`` flags.

    ``--source`` replaces the configured source set (a known name keeps its field mapping, a new
    one uses the plain ``text``/``id`` mapping). ``--benchmark`` adds to the configured set (a
    known name gets the new path): decontamination should never silently lose a benchmark.
    """
    update: dict[str, Any] = {}
    if sources:
        update["sources"] = {
            name: (settings.sources[name].model_copy(update={"glob": glob}) if name in settings.sources
                   else SourceSettings(glob=glob))
            for name, glob in sources.items()
        }
    if benchmarks:
        merged = dict(settings.benchmarks)
        for name, path in benchmarks.items():
            merged[name] = (merged[name].model_copy(update={"path": path}) if name in merged
                            else BenchmarkSettings(path=path))
        update["benchmarks"] = merged
    return settings.model_copy(update=update) if update else settings


def summarize(run_id: str, stages: dict[str, dict[str, Any]], report: dict[str, Any],
              tables: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The one JSON object ``jzlake curate`` prints last."""
    ingest, clean, dedupe, decon = (stages[s] for s in ("ingest", "clean", "dedupe", "decontaminate"))
    return {
        "run_id": run_id,
        "ingested": ingest["ingested"],
        "already_present": ingest["already_present"],
        "quarantined": ingest["quarantined"],
        "kept": decon["kept"],
        "dropped": clean["dropped"],
        "exact_duplicates": dedupe["exact_duplicates"],
        "near_duplicates": dedupe["near_duplicates"],
        "contaminated": decon["contaminated"],
        # Earlier documents this run took out of gold: a survivor beaten by a new duplicate, a
        # document a changed benchmark set now flags.
        "displaced_survivors": dedupe.get("displaced_survivors", 0),
        "removed_from_gold": decon.get("removed_from_gold", 0),
        # Documents of earlier runs a stage picked up now (ingested + carried = every outcome above).
        "carried_from_earlier_runs": report["carried_from_earlier_runs"],
        "balanced": report["balanced"],
        "report": report["report_html"],
        "tables": {name: {"version": info["version"], "rows": info["rows"]} for name, info in tables.items()},
    }


def run_curation(spark: SparkSession, settings: Settings, run_id: str) -> dict[str, Any]:
    """Every curation stage in order under one run id; the report raises if the counts do not add up."""
    from spark_jobs import clean, decontaminate, dedupe, ingest, report

    stages: dict[str, dict[str, Any]] = {}
    for name, module in (("ingest", ingest), ("clean", clean), ("dedupe", dedupe),
                         ("decontaminate", decontaminate)):
        log.info("curation %s: %s", run_id, name)
        stages[name] = module.run(spark, settings, run_id)
        write_stage_summary(settings, run_id, name, stages[name])
    report_summary = report.run(spark, settings, run_id, summaries=stages)  # raises if unbalanced
    tables = {name: describe_table(catalogue.table(name), settings) for name in CURATION_TABLES}
    return summarize(run_id, stages, report_summary, tables)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", action="append", metavar="NAME=GLOB",
                        help="ingest this source instead of the configured ones (repeatable)")
    parser.add_argument("--benchmark", action="append", metavar="NAME=PATH",
                        help="also decontaminate against this benchmark file (repeatable)")
    parser.add_argument("--run-id", help="run id to stamp on rows (default: a new one)")


def settings_for(args: argparse.Namespace, settings: Settings) -> Settings:
    """``settings`` with this command's ``--source``/``--benchmark`` flags applied (their paths
    relative to the caller's working directory, like ``--lake-root``)."""
    return with_cli_inputs(settings, parse_key_values(args.source, "--source", paths=True),
                           parse_key_values(args.benchmark, "--benchmark", paths=True))


def run(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    from spark_jobs.session import get_spark

    settings = settings_for(args, settings)
    spark = get_spark(settings, app_name="jzlake-curate")
    return run_curation(spark, settings, args.run_id or new_run_id("curate"))


if __name__ == "__main__":
    from jzlake.cli import main

    sys.exit(main(["curate", *sys.argv[1:]]))
