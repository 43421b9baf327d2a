"""
# Lake maintenance

Daily upkeep of every catalogued Delta table (`spark_jobs/maintenance.py`, also `jzlake maintain`).

```
maintain: OPTIMIZE (compaction) ─▶ VACUUM (retention >= 7 days) ─▶ generation ledgers compacted
```

One Spark job through the `spark_default` connection. Rows never change: compaction rewrites the
same rows into fewer files and VACUUM deletes only files older than the retention
(`maintenance.vacuum_retention_hours`, refused below 168 h), so consumers pinned to a recent
version (asset events carry the version they should read) still find their files. No outlets:
maintenance is not new data and must not trigger downstream DAGs. The summary (XCom, runs
folder) lists per table the files compacted and deleted and the versions before and after.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import DAG

from plugins.dag_settings import dag_settings
from plugins.spark_submit import dag_default_args, lake_spark_task

settings = dag_settings()

with DAG(
    dag_id="lake_maintenance",
    schedule="@daily",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=dag_default_args(settings),
    tags=["jzlake", "maintenance", "spark", "delta"],
    doc_md=__doc__,
) as dag:
    lake_spark_task("maintain", "maintenance", settings)
