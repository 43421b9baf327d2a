"""Curation report: counts per stage/source/reason, length and quality histograms, duplicate
cluster sizes → ``<runs_dir>/<run_id>/report.html`` (plots inline) and ``report.json``.

Stage counts come from the stage summaries the run wrote (``jzlake.runs``); per-source and
distribution figures are aggregated in Spark from the tables (only small results reach the
driver). The run's record accounting is checked here too (``reconcile``), stage by stage and
overall: ``ingested + carried = already_present + quarantined + dropped + exact + near +
contaminated + kept``, where ``carried`` (documents of earlier runs a stage picked up now) is
counted from the tables, never derived from the gap it would otherwise hide.
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


# (stage, upstream stage, the upstream count it passes on): each stage's input must be exactly what
# its upstream passed on in this run plus documents of earlier runs it picked up (counted apart).
BOUNDARIES: tuple[tuple[str, str, str], ...] = (
    ("clean", "ingest", "new_documents"),
    ("dedupe", "clean", "kept"),
    ("decontaminate", "dedupe", "survivors"),
)
# Each stage's own accounting: input field = sum of its outcome fields.
STAGE_BALANCES: dict[str, tuple[str, tuple[str, ...]]] = {
    "ingest": ("ingested", ("new_documents", "already_present", "quarantined")),
    "clean": ("input", ("kept", "dropped")),
    "dedupe": ("input", ("survivors", "exact_duplicates", "near_duplicates")),
    "decontaminate": ("input", ("contaminated", "kept")),
}


def _count(summary: dict[str, Any], key: str) -> int:
    value = summary.get(key, 0)
    return int(sum(value.values())) if isinstance(value, dict) else int(value or 0)


def reconcile(summaries: dict[str, dict[str, Any]], carried: dict[str, int] | None = None) -> dict[str, Any]:
    """The run's record accounting; ``balanced`` says if every record is accounted for.

    ``carried[stage]``: documents of *earlier* runs that ``stage`` took in during this run (a run
    that stopped half-way, a changed benchmark set re-checking gold), counted from the tables by
    ``count_carried`` — independently of the summaries, so a gap cannot hide in them. Missing
    means 0. Checked: each stage's own balance; at each boundary, input = what the upstream stage
    passed on + carried (a shortfall is a lost record, an excess an unexplained one); overall,
    ``ingested + carried = already_present + quarantined + dropped + exact + near + contaminated + kept``.
    """
    carried = {stage: int((carried or {}).get(stage, 0)) for stage, _, _ in BOUNDARIES}
    stages = {name: summaries.get(name) or {} for name in STAGE_BALANCES}
    problems: list[str] = []
    for name, (total, outcomes) in STAGE_BALANCES.items():
        got = sum(_count(stages[name], key) for key in outcomes)
        if _count(stages[name], total) != got:
            problems.append(f"{name}: {total} {_count(stages[name], total)} != {' + '.join(outcomes)} = {got}")
    boundaries: list[dict[str, Any]] = []
    for stage, upstream, passed_key in BOUNDARIES:
        passed, extra, took = _count(stages[upstream], passed_key), carried[stage], _count(stages[stage], "input")
        gap = took - passed - extra
        boundaries.append({"boundary": f"{upstream} → {stage}", "passed on": passed,
                           "carried from earlier runs": extra, "input": took, "gap": gap})
        if extra < 0:
            problems.append(f"{stage}: negative count of documents carried from earlier runs ({extra})")
        if gap < 0:
            problems.append(f"{upstream} → {stage}: {-gap} document(s) lost ({upstream} passed on {passed}, "
                            f"{extra} carried from earlier runs, {stage} took {took})")
        elif gap > 0:
            problems.append(f"{upstream} → {stage}: {gap} document(s) {stage} took are neither from {upstream} "
                            f"in this run ({passed}) nor carried from earlier runs ({extra})")
    ingest, clean, dedupe, decon = (stages[s] for s in STAGES)
    parts = {
        "already_present": _count(ingest, "already_present"),
        "quarantined": _count(ingest, "quarantined"),
        "dropped": _count(clean, "dropped"),
        "exact_duplicates": _count(dedupe, "exact_duplicates"),
        "near_duplicates": _count(dedupe, "near_duplicates"),
        "contaminated": _count(decon, "contaminated"),
        "kept": _count(decon, "kept"),
    }
    ingested, carried_total = _count(ingest, "ingested"), sum(carried.values())
    if ingested + carried_total != sum(parts.values()):
        problems.append(f"ingested {ingested} + carried {carried_total} != {sum(parts.values())} accounted for")
    return {
        "ingested": ingested,
        **parts,
        "carried_from_earlier_runs": carried_total,
        "carried": carried,
        "boundaries": boundaries,
        "problems": problems,
        "balanced": not problems,
    }


def count_carried(spark: SparkSession, settings: Settings, run_id: str,
                  summaries: dict[str, dict[str, Any]]) -> dict[str, int]:
    """Per stage, documents of earlier runs it processed in ``run_id``, counted from the tables.

    clean: rows it wrote now (silver.documents + silver.dropped) whose bronze row an earlier run
    ingested. dedupe: signatures written now for documents an earlier run cleaned. decontaminate:
    silver.dedup rows (at the version it read) of earlier runs that it decided now — all of them
    when it re-checked everything (benchmarks or rules changed), else those put into gold.corpus or
    gold.contamination now. Only doc ids move; aggregation stays in Spark.
    """
    from pyspark.sql import functions as F

    def table(name: str, version: int | None = None) -> DataFrame:
        return read_table(spark, catalogue.table(name), settings, version)

    now = F.col("run_id") == run_id

    def ids(name: str, this_run: bool, version: int | None = None) -> DataFrame:
        return table(name, version).where(now if this_run else ~now).select("doc_id")

    cleaned = ids("silver.documents", True).unionByName(ids("silver.dropped", True))
    carried = [
        cleaned.join(ids("bronze.documents", False), "doc_id", "left_semi").withColumn("stage", F.lit("clean")),
        ids("silver.minhash_signatures", True).join(ids("silver.documents", False), "doc_id", "left_semi")
        .withColumn("stage", F.lit("dedupe")),
    ]
    decon = summaries.get("decontaminate") or {}
    earlier = ids("silver.dedup", False, decon.get("silver_dedup_version"))
    if not decon.get("rechecked_all"):
        decided = ids("gold.corpus", True).unionByName(ids("gold.contamination", True))
        earlier = earlier.join(decided, "doc_id", "left_semi")
    carried.append(earlier.withColumn("stage", F.lit("decontaminate")))
    union = carried[0].unionByName(carried[1]).unionByName(carried[2])
    counts = {row["stage"]: int(row["count"]) for row in union.groupBy("stage").count().collect()}  # one job
    return {stage: counts.get(stage, 0) for stage in ("clean", "dedupe", "decontaminate")}


def histograms(df: DataFrame, specs: dict[str, tuple[str, list[float]]]) -> dict[str, list[int]]:
    """``{name: counts}`` for ``specs = {name: (column, bins)}``: counts per ``[bins[i], bins[i+1])``
    (last bucket closed; nulls and values outside the bins are left out). One Spark pass for all."""
    from pyspark.sql import functions as F

    aggregates = []
    for name, (column, bins) in specs.items():
        value = F.col(column).cast("double")
        inside = value.isNotNull() & (value >= bins[0]) & (value <= bins[-1])
        bucket = sum((F.when(value >= edge, 1).otherwise(0) for edge in bins[1:-1]), F.lit(0))
        aggregates += [F.sum(F.when(inside & (bucket == i), 1).otherwise(0)).alias(f"{name}__{i}")
                       for i in range(len(bins) - 1)]
    row = df.agg(*aggregates).first()
    return {name: [int(row[f"{name}__{i}"] or 0) for i in range(len(bins) - 1)]
            for name, (_, bins) in specs.items()}


def histogram(df: DataFrame, column: str, bins: list[float]) -> list[int]:
    """One column's histogram (see ``histograms``)."""
    return histograms(df, {"h": (column, bins)})["h"]


def grouped_counts(df: DataFrame, *columns: str) -> list[dict[str, Any]]:
    return [r.asDict() for r in df.groupBy(*columns).count().orderBy(*columns).collect()]


FLAGGED_PER_BENCHMARK = 25  # flagged documents shown per benchmark (all are in gold.contamination)
SPAN_CHARS = 300


def flagged_examples(findings: DataFrame, settings: Settings, per_benchmark: int = FLAGGED_PER_BENCHMARK
                     ) -> dict[str, list[dict[str, Any]]]:
    """Per benchmark, flagged documents (lowest coverage first: the doubtful ones) with the matched
    span and the item it matched, so a flag can be checked by eye."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    from jzlake.benchmarks import load_benchmarks

    order = Window.partitionBy("benchmark").orderBy(F.col("coverage").asc_nulls_last(), "doc_id", "item_id")
    rows = (findings.withColumn("_n", F.row_number().over(order)).where(F.col("_n") <= per_benchmark)
            .select("benchmark", "doc_id", "source", "item_id", "rule", "coverage", "span_start", "span_end",
                    F.substring("matched_ngram", 1, SPAN_CHARS).alias("matched_span"))
            .orderBy("benchmark", "_n").collect())
    try:  # the item text beside the span; a benchmark no longer configured shows none
        items = {(b, i.item_id): i.text for b, v in load_benchmarks(settings).items() for i in v}
    except (OSError, ValueError):
        items = {}
    examples: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        record = row.asDict()
        text = items.get((record["benchmark"], record["item_id"]))
        record["item_text"] = text[:SPAN_CHARS] if text else None
        examples.setdefault(record.pop("benchmark"), []).append(record)
    return examples


def collect_figures(spark: SparkSession, settings: Settings, run_id: str) -> dict[str, Any]:
    """Everything the report shows that comes from the tables: this run's rows (``run_id``) and,
    labelled apart, the whole lake's."""
    from pyspark.sql import functions as F

    tables: dict[str, DataFrame] = {}

    def table(name: str) -> DataFrame:  # one snapshot per table for the whole report
        if name not in tables:
            tables[name] = read_table(spark, catalogue.table(name), settings)
        return tables[name]

    def this_run(name: str) -> DataFrame:
        return table(name).where(F.col("run_id") == run_id)

    silver, dropped = table("silver.documents"), table("silver.dropped")
    clusters, corpus = table("silver.duplicate_clusters"), table("gold.corpus")
    cluster_sizes = clusters.where(F.col("is_survivor")).groupBy("cluster_size").count()
    sources = silver.select("doc_id", "source")
    # This run's duplicates: documents dedupe signed now (its input) that lost to a survivor.
    # Non-survivor rows alone would also hold earlier duplicates whose cluster merged now.
    duplicates = (clusters.where(~F.col("is_survivor"))
                  .join(this_run("silver.minhash_signatures").select("doc_id"), "doc_id", "left_semi")
                  .join(sources, "doc_id", "left"))
    flagged = (this_run("gold.contamination").select("doc_id", "benchmark").distinct()
               .join(sources, "doc_id", "left"))

    return {
        "this_run": {
            "new_documents_by_source": grouped_counts(this_run("bronze.documents"), "source"),
            "quarantine_by_reason": grouped_counts(this_run("bronze.quarantine"), "source", "reason"),
            "dropped_by_source_reason": grouped_counts(this_run("silver.dropped"), "source", "primary_reason"),
            "kept_by_source": grouped_counts(this_run("silver.documents"), "source"),
            "duplicates_by_source_kind": grouped_counts(duplicates, "source", "kind"),
            "contaminated_by_source_benchmark": grouped_counts(flagged, "source", "benchmark"),
            "flagged_examples": flagged_examples(this_run("gold.contamination").join(sources, "doc_id", "left"),
                                                 settings),
        },
        "corpus": {
            "gold_by_source": grouped_counts(corpus, "source"),
            "contamination_by_benchmark": grouped_counts(table("gold.contamination"), "benchmark"),
            "cluster_size_distribution": [r.asDict() for r in cluster_sizes.orderBy("cluster_size").collect()],
        },
        "histograms": {
            "length_bins": LENGTH_BINS,
            "score_bins": SCORE_BINS,
            "this_run": distributions(this_run("silver.documents"), this_run("silver.dropped")),
            "whole_lake": distributions(silver, dropped),
        },
    }


def distributions(kept: DataFrame, dropped: DataFrame) -> dict[str, list[int]]:
    """Length, quality-score and math-density histograms of kept and dropped documents."""
    from pyspark.sql import functions as F

    kept = kept.withColumn("_md", F.least(F.col("math_density"), F.lit(0.999)))  # density 1.0 → top bucket
    return {
        **histograms(kept, {"kept_words": ("n_words", LENGTH_BINS), "quality_score": ("quality_score", SCORE_BINS),
                            "math_density": ("_md", SCORE_BINS)}),
        "dropped_words": histogram(dropped, "n_words", LENGTH_BINS),
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


def render_plots(figures: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """``{key: (title, base64 PNG)}``: histograms for this run and the whole lake, cluster sizes."""
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

    plots: dict[str, tuple[str, str]] = {}
    for scope, label in (("this_run", "this run"), ("whole_lake", "whole lake")):
        d = h[scope]
        title = f"Document length in words ({label})"
        plots[f"lengths_{scope}"] = (title, _plot(bars(
            length_labels, {"kept": d["kept_words"], "dropped": d["dropped_words"]}, title, "words")))
        title = f"Quality score and math density, kept documents ({label})"
        plots[f"quality_{scope}"] = (title, _plot(bars(
            score_labels, {"quality score": d["quality_score"], "math density": d["math_density"]}, title, "score")))
    sizes = figures["corpus"]["cluster_size_distribution"]
    title = "Duplicate cluster sizes (whole lake)"
    plots["clusters_whole_lake"] = (title, _plot(bars(
        [str(s["cluster_size"]) for s in sizes] or ["none"], {"clusters": [s["count"] for s in sizes] or [0]},
        title, "members per cluster")))
    return plots


def _table_html(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "<p><em>none</em></p>"
    head = "".join(f"<th>{html.escape(str(k))}</th>" for k in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in r.values()) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def render_html(report: dict[str, Any], plots: dict[str, tuple[str, str]]) -> str:
    rec = report["reconciliation"]
    totals = {k: v for k, v in rec.items() if not isinstance(v, list | dict)}
    stage_rows = [{"stage": s, **{k: v for k, v in (report["stages"].get(s) or {}).items()
                                  if isinstance(v, int | float | str)}} for s in STAGES]
    problems = "".join(f"<li>{html.escape(p)}</li>" for p in rec.get("problems", []))
    sections = [
        f"<h1>Curation report — run {html.escape(report['run_id'])}</h1>",
        f"<p>Lake: <code>{html.escape(report['lake_root'])}</code></p>",
        "<h2>Record accounting</h2>", _table_html([totals]),
        "<h3>Stage boundaries</h3>", _table_html(rec.get("boundaries", [])),
        f"<p><strong>Unaccounted records:</strong></p><ul>{problems}</ul>" if problems else "",
        "<h2>Stages</h2>", "".join(_table_html([r]) for r in stage_rows),
    ]
    for title, key in [("New documents by source", "new_documents_by_source"),
                       ("Quarantine by reason", "quarantine_by_reason"),
                       ("Dropped by source and reason", "dropped_by_source_reason"),
                       ("Kept (silver) by source", "kept_by_source"),
                       ("Duplicates removed by source and kind", "duplicates_by_source_kind"),
                       ("Documents flagged by source and benchmark", "contaminated_by_source_benchmark")]:
        sections += [f"<h2>{title} (this run)</h2>", _table_html(report["figures"]["this_run"][key])]
    for benchmark, rows in sorted(report["figures"]["this_run"].get("flagged_examples", {}).items()):
        sections += [f"<h2>Flagged documents: {html.escape(benchmark)} (this run, lowest coverage first)</h2>",
                     _table_html(rows)]
    for title, key in [("Gold corpus by source", "gold_by_source"),
                       ("Contamination findings by benchmark", "contamination_by_benchmark")]:
        sections += [f"<h2>{title} (whole lake)</h2>", _table_html(report["figures"]["corpus"][key])]
    sections += [f'<h2>{html.escape(title)}</h2><img alt="{key}" src="data:image/png;base64,{png}"/>'
                 for key, (title, png) in plots.items()]
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
        "reconciliation": reconcile(summaries, count_carried(spark, settings, run_id, summaries)),
        "figures": collect_figures(spark, settings, run_id),
    }
    folder = run_dir(settings, run_id)
    json_path = write_text(f"{folder}/report.json", json.dumps(report, indent=2, sort_keys=True, default=str))
    html_path = write_text(f"{folder}/report.html", render_html(report, render_plots(report["figures"])))
    if not report["reconciliation"]["balanced"]:
        # Fail the run (and its Airflow task): a record went missing somewhere between stages.
        raise RuntimeError(f"curation run {run_id}: record counts do not reconcile: "
                           f"{'; '.join(report['reconciliation']['problems'])}. Every stage's rows carry "
                           f"run_id {run_id!r}; see {html_path}")
    return {"report_html": html_path, "report_json": json_path, "balanced": True,
            "carried_from_earlier_runs": report["reconciliation"]["carried_from_earlier_runs"]}


if __name__ == "__main__":
    sys.exit(job_main(run, "report"))
