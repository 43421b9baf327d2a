"""
# LESS influence selection

Ranks the curated corpus by gradient influence on the target tasks (GSM8K, MATH by subject) and
keeps the most valuable texts for teacher distillation (JiuZhang3.0 §2.2, LESS).

```
gold.corpus ──▶ prepare ──▶ score[0..n-1] ──▶ commit_select ──▶ gold.influence_scores, gold.selected_texts
               (pin version,  (mapped shards:   (MERGE staged shards,
                LoRA warm-up,  Adam-preconditioned  top-k / top-fraction,
                target grads)  features, scores)    MLflow run)
```

Every task is a GPU job (`plugins/gpu_job.py`) running `python -m models.influence --phase …`
on the configured backend (`settings.gpu.backend`: a local subprocess or a Kubernetes pod).
Tasks of one DAG run share the influence run through `--run-name {{ run_id }}`; shards leave
completion markers, so retries skip finished shards, and the run id is content-addressed, so a
rerun over an unchanged corpus commits nothing. Runs whenever `gold.corpus` is updated, and reads
it at exactly the version in the triggering asset event (`prepare --input-version N`,
`plugins/assets.py`), however many writes land before the task starts; a manual run reads the latest.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import DAG, chain

from plugins.assets import table_asset
from plugins.dag_settings import dag_settings
from plugins.gpu_job import GpuJobSpec, Resources, gpu_job_task, sharded_gpu_job_task
from plugins.spark_submit import dag_default_args

settings = dag_settings()
MODULE = "models.influence"
RUN = ["--run-name", "{{ run_id }}"]
INPUT = settings.influence.input_table  # gold.corpus
shards = settings.influence.num_shards

with DAG(
    dag_id="influence_selection",
    schedule=[table_asset(INPUT, settings)],
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=dag_default_args(settings),
    tags=["jzlake", "influence", "less", "gpu"],
    doc_md=__doc__,
) as dag:
    prepare = gpu_job_task("prepare", GpuJobSpec(
        name="influence-prepare", module=MODULE, args=["--phase", "prepare", *RUN],
        pins={"--input-version": INPUT}), settings)
    score = sharded_gpu_job_task("score", GpuJobSpec(
        name="influence-score", module=MODULE, args=["--phase", "score", *RUN], num_shards=shards), settings)
    commit = gpu_job_task("commit_select", GpuJobSpec(
        name="influence-commit", module=MODULE, args=["--phase", "commit", *RUN, "--num-shards", str(shards)],
        resources=Resources(gpus=0, cpu="2", memory="8Gi")), settings,
        outlets=[table_asset("gold.influence_scores", settings), table_asset("gold.selected_texts", settings)])
    chain(prepare, score, commit)
