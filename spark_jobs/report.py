"""Curation report: counts per stage/source/reason, length and quality histograms, duplicate
cluster sizes → ``<runs_dir>/<run_id>/report.html`` (plots inline) and ``report.json``.

Stage counts come from the stage summaries the run wrote (``jzlake.runs``); per-source and
distribution figures are aggregated in Spark from the tables (only small results reach the
driver). The run's record accounting is checked here too:
``ingested = already_present + quarantined + dropped + exact + near + contaminated + kept``.
"""

from __future__ import annotations

import base64
import html
import io
import json
import sys
from typing import TYPE_CHECKING, Any

from jzlake import catalogue
from jzlake.runs import read_stage_summary, run_dir, write_text
from spark_jobs.runner import job_main
from spark_jobs.session import read_table

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

    from jzlake.settings import Settings

STAGES = ("ingest", "clean", "dedupe", "decontaminate")
LENGTH_BINS = [0, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10_000, 50_000, 10**9]
SCORE_BINS = [round(i / 20, 2) for i in range(21)]


def reconcile(summaries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The run's record accounting from its stage summaries; ``balanced`` says if it adds up."""
    ingest = summaries.get("ingest") or {}
    clean = summaries.get("clean") or {}
    dedupe = summaries.get("dedupe") or {}
    decon = summaries.get("decontaminate") or {}
    parts = {
        "already_present": int(ingest.get("already_present", 0)),
        "quarantined": int(ingest.get("quarantined", 0)),
        "dropped": int(sum((clean.get("dropped") or {}).values())),
        "exact_duplicates": int(dedupe.get("exact_duplicates", 0)),
        "near_duplicates": int(dedupe.get("near_duplicates", 0)),
        "contaminated": int(decon.get("contaminated", 0)),
        "kept": int(decon.get("kept", 0)),
    }
    ingested = int(ingest.get("ingested", 0))
    # Docs of earlier runs picked up by a later stage in this run (a run that stopped half-way,
    # a changed benchmark set re-checking the corpus) were not ingested now: count them apart.
    carried = (
        int(clean.get("input", 0)) - int(ingest.get("new_documents", 0))
        + int(dedupe.get("input", 0)) - int(clean.get("kept", 0))
        + int(decon.get("input", 0)) - int(dedupe.get("survivors", 0))
    )
    return {
        "ingested": ingested,
        **parts,
        "carried_from_earlier_runs": carried,
        "balanced": ingested + carried == sum(parts.values()),
    }


def histogram(df: DataFrame, column: str, bins: list[float]) -> list[int]:
    """Counts per ``[bins[i], bins[i+1])`` bucket, computed in Spark (last bucket closed)."""
    from pyspark.ml.feature import Bucketizer

    if df.isEmpty():
        return [0] * (len(bins) - 1)
    bucketizer = Bucketizer(splits=bins, inputCol=column, outputCol="_bucket", handleInvalid="skip")
    rows = bucketizer.transform(df.select(df[column].cast("double").alias(column))).groupBy("_bucket").count()
    counts = [0] * (len(bins) - 1)
    for row in rows.collect():
        counts[int(row["_bucket"])] = int(row["count"])
    return counts


def grouped_counts(df: DataFrame, *columns: str) -> list[dict[str, Any]]:
    return [r.asDict() for r in df.groupBy(*columns).count().orderBy(*columns).collect()]


def collect_figures(spark: SparkSession, settings: Settings, run_id: str) -> dict[str, Any]:
    """Everything the report shows that comes from the tables."""
    from pyspark.sql import functions as F

    def table(name: str) -> DataFrame:
        return read_table(spark, catalogue.table(name), settings)

    silver, dropped = table("silver.documents"), table("silver.dropped")
    clusters, corpus = table("silver.duplicate_clusters"), table("gold.corpus")
    cluster_sizes = clusters.where(F.col("is_survivor")).groupBy("cluster_size").count()

    def this_run(name: str) -> DataFrame:
        return table(name).where(F.col("run_id") == run_id)

    return {
        "this_run": {
            "new_documents_by_source": grouped_counts(this_run("bronze.documents"), "source"),
            "quarantine_by_reason": grouped_counts(this_run("bronze.quarantine"), "source", "reason"),
            "dropped_by_source_reason": grouped_counts(this_run("silver.dropped"), "source", "primary_reason"),
            "kept_by_source": grouped_counts(this_run("silver.documents"), "source"),
        },
        "corpus": {
            "gold_by_source": grouped_counts(corpus, "source"),
            "contamination_by_benchmark": grouped_counts(table("gold.contamination"), "benchmark"),
            "cluster_size_distribution": [r.asDict() for r in cluster_sizes.orderBy("cluster_size").collect()],
        },
        "histograms": {
            "length_bins": LENGTH_BINS,
            "kept_words": histogram(silver, "n_words", LENGTH_BINS),
            "dropped_words": histogram(dropped, "n_words", LENGTH_BINS),
            "score_bins": SCORE_BINS,
            "quality_score": histogram(silver, "quality_score", SCORE_BINS),
            "math_density": histogram(
                silver.withColumn("md", F.least(F.col("math_density"), F.lit(0.999))), "md", SCORE_BINS),
        },
    }


def _plot(draw: Any) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    draw(ax)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def render_plots(figures: dict[str, Any]) -> dict[str, str]:
    """Base64 PNGs for the histograms and the cluster-size distribution."""
    h = figures["histograms"]
    length_labels = [f"<{b}" if b < 10**9 else "more" for b in h["length_bins"][1:]]
    score_labels = [f"{b:.2f}" for b in h["score_bins"][:-1]]

    def bars(labels: list[str], series: dict[str, list[int]], title: str, xlabel: str) -> Any:
        def draw(ax: Any) -> None:
            width = 0.8 / max(len(series), 1)
            for i, (name, counts) in enumerate(series.items()):
                ax.bar([x + i * width for x in range(len(labels))], counts, width=width, label=name)
            ax.set_xticks(range(len(labels)), labels, rotation=60, fontsize=7)
            ax.set_title(title)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("documents")
            ax.legend(fontsize=7)
        return draw

    sizes = figures["corpus"]["cluster_size_distribution"]
    return {
        "lengths": _plot(bars(length_labels, {"kept": h["kept_words"], "dropped": h["dropped_words"]},
                              "Document length (words)", "words")),
        "quality": _plot(bars(score_labels, {"quality score": h["quality_score"], "math density": h["math_density"]},
                              "Quality score and math density (silver)", "score")),
        "clusters": _plot(bars([str(s["cluster_size"]) for s in sizes] or ["none"],
                               {"clusters": [s["count"] for s in sizes] or [0]},
                               "Duplicate cluster sizes", "members per cluster")),
    }


def _table_html(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "<p><em>none</em></p>"
    head = "".join(f"<th>{html.escape(str(k))}</th>" for k in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in r.values()) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def render_html(report: dict[str, Any], plots: dict[str, str]) -> str:
    rec = report["reconciliation"]
    stage_rows = [{"stage": s, **{k: v for k, v in (report["stages"].get(s) or {}).items()
                                  if isinstance(v, int | float | str)}} for s in STAGES]
    sections = [
        f"<h1>Curation report — run {html.escape(report['run_id'])}</h1>",
        f"<p>Lake: <code>{html.escape(report['lake_root'])}</code></p>",
        "<h2>Record accounting</h2>", _table_html([rec]),
        "<h2>Stages</h2>", "".join(_table_html([r]) for r in stage_rows),
    ]
    for title, key in [("New documents by source", "new_documents_by_source"),
                       ("Quarantine by reason", "quarantine_by_reason"),
                       ("Dropped by source and reason", "dropped_by_source_reason"),
                       ("Kept (silver) by source", "kept_by_source")]:
        sections += [f"<h2>{title} (this run)</h2>", _table_html(report["figures"]["this_run"][key])]
    for title, key in [("Gold corpus by source", "gold_by_source"),
                       ("Contamination by benchmark", "contamination_by_benchmark")]:
        sections += [f"<h2>{title} (whole lake)</h2>", _table_html(report["figures"]["corpus"][key])]
    sections += [f'<h2>Distributions</h2><img alt="{k}" src="data:image/png;base64,{v}"/>' for k, v in plots.items()]
    style = ("body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse;"
             "margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 8px;font-size:90%}")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>Curation {html.escape(report['run_id'])}</title>" \
           f"<style>{style}</style></head><body>{''.join(sections)}</body></html>"


def run(spark: SparkSession, settings: Settings, run_id: str,
        summaries: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Write the report for ``run_id``; stage summaries default to those saved in the run folder."""
    summaries = summaries or {s: read_stage_summary(settings, run_id, s) or {} for s in STAGES}
    report = {
        "run_id": run_id,
        "lake_root": settings.lake_root,
        "stages": summaries,
        "reconciliation": reconcile(summaries),
        "figures": collect_figures(spark, settings, run_id),
    }
    folder = run_dir(settings, run_id)
    json_path = write_text(f"{folder}/report.json", json.dumps(report, indent=2, sort_keys=True, default=str))
    html_path = write_text(f"{folder}/report.html", render_html(report, render_plots(report["figures"])))
    if not report["reconciliation"]["balanced"]:
        # Fail the run (and its Airflow task): a record went missing somewhere between stages.
        raise RuntimeError(f"curation run {run_id}: record counts do not reconcile "
                           f"({report['reconciliation']}); see {html_path}")
    return {"report_html": html_path, "report_json": json_path, "balanced": True}


if __name__ == "__main__":
    sys.exit(job_main(run, "report"))
