"""
# Corpus curation

Open math corpora → clean, deduplicated, decontaminated Delta tables (JiuZhang3.0, stage 1).

```
ingest ──▶ clean ──▶ dedupe ──▶ decontaminate ──▶ report
bronze.*   silver.documents/dropped   silver.dedup + clusters   gold.corpus + contamination
```

Each task is one Spark job (`spark_jobs/<job>.py`) submitted with `spark-submit` through the
`spark_default` connection (local by default; `AIRFLOW_CONN_SPARK_DEFAULT='spark://host:7077'`
for a cluster). Jobs MERGE on stable keys, so retries and reruns change nothing; the tasks
share the DAG run id, and `report` writes the run's HTML/JSON report to the runs folder.
Outlets are the produced tables' Assets (`lake.<layer>.<name>`); their events carry the Delta
version and row count, and consumers (`influence_selection`) read exactly that version.
Data-quality gate: after `decontaminate`, its kept fraction and `gold.corpus` row count are checked
against `quality.stages.decontaminate` (`plugins/quality.py`) before its events are emitted; a
broken bound fails the run, with the numbers, and no downstream DAG starts.
Settings: `JZLAKE_CONFIG` / `JZLAKE__*` (see `plugins/dag_settings.py`).
"""

from __future__ import annotations

import pendulum
from airflow.sdk import DAG, chain

from plugins.assets import table_asset
from plugins.dag_settings import dag_settings
from plugins.spark_submit import dag_default_args, lake_spark_task

settings = dag_settings()

# job → the tables it writes (its outlets), in pipeline order.
STAGES: dict[str, tuple[str, ...]] = {
    "ingest": ("bronze.documents", "bronze.quarantine", "bronze.ingested_files"),
    "clean": ("silver.documents", "silver.dropped"),
    "dedupe": ("silver.minhash_signatures", "silver.duplicate_edges", "silver.duplicate_clusters", "silver.dedup"),
    "decontaminate": ("gold.contamination", "gold.corpus"),
    "report": (),
}

with DAG(
    dag_id="corpus_curation",
    schedule="@weekly",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,  # two runs MERGE-ing into the same tables would only contend
    default_args=dag_default_args(settings),
    tags=["jzlake", "curation", "spark", "delta"],
    doc_md=__doc__,
) as dag:
    chain(*[
        lake_spark_task(job, job, settings, outlets=[table_asset(name, settings) for name in tables])
        for job, tables in STAGES.items()
    ])
