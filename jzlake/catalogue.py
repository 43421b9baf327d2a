"""Every table of the lake, once: layer, name, schema, merge keys, partitioning.

Nothing else spells a table path. Spark jobs ask for ``spark_schema()``; GPU jobs (no JVM)
ask for ``arrow_schema()`` and read/write with the ``deltalake`` package. Both come from the
same column list, written in a small type vocabulary::

    string long int double boolean timestamp binary
    array<string> array<long> array<int> array<double> map<string,double> map<string,long>

Usage::

    table = catalogue.table("silver.documents")
    table.uri(settings)      # <lake root>/silver/documents
    table.merge_keys         # ("doc_id",)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # keep pyspark/pyarrow out of import time
    import pyarrow as pa
    from pyspark.sql.types import StructType

    from jzlake.settings import Settings

# Columns every output row carries (lineage).
RUN_ID = ("run_id", "string")

# Request ledgers (generation). ``key`` = GenerationRequest.key; status: pending | sending |
# submitting | submitted | succeeded | failed | abandoned; ``calls`` = calls counted against the
# call cap (every HTTP attempt, retries included; one per Batch API request), ``attempts`` = HTTP
# attempts; ``failures`` = sends that ended failed (``abandoned`` at generation.max_attempts_per_key);
# ``spent_tokens``/``spent_usd`` = cumulative spend of the key over all its calls (a call lost in a
# crash counts at its reserved worst case), what the caps sum; ``prompt_tokens``/``completion_tokens``/
# ``cost_usd`` = the last answer's; ``messages`` = the exact chat sent (JSON), ``prompt`` its last user turn.
# Partitioned by ``key_bucket`` (the key's first hex digit: 16 partitions): a write-through commit rewrites
# one small partition instead of the whole ledger. ``claim_run_id``/``claim_id``/``lease_expires_at``:
# who holds a ``sending``/``submitting`` key (``claim_id`` ends with the holder's boot id, PID namespace,
# pid and start time) and until when; ``flags``: what was changed
# to store the row (e.g. ``sanitised_surrogates``).
LEDGER_COLUMNS: tuple[tuple[str, str], ...] = (
    ("key", "string"), ("status", "string"), ("model", "string"), ("template_id", "string"),
    ("template_hash", "string"), ("prompt", "string"), ("messages", "string"), ("sampling", "string"),
    ("sample_index", "long"), ("response", "string"), ("finish_reason", "string"),
    ("prompt_tokens", "long"), ("completion_tokens", "long"), ("cost_usd", "double"),
    ("latency_s", "double"), ("error", "string"), ("attempts", "long"), ("calls", "long"),
    ("failures", "long"), ("spent_tokens", "long"), ("spent_usd", "double"),
    ("backend", "string"), ("batch_id", "string"), ("batch_input_file_id", "string"),
    ("doc_id", "string"), ("excerpt_start", "long"), ("excerpt_end", "long"),
    ("model_name", "string"), ("model_version", "string"), ("model_uri", "string"), ("seed", "long"),
    ("lineage", "string"), RUN_ID, ("created_at", "timestamp"), ("updated_at", "timestamp"),
    ("key_bucket", "string"), ("claim_run_id", "string"), ("claim_id", "string"),
    ("lease_expires_at", "timestamp"), ("flags", "string"),
)


# Generated samples (models/distil.py, models/synthesize.py): one row per request key, with the
# lineage of the request that produced it (source document, excerpt offsets, template, model).
SAMPLE_LINEAGE: tuple[tuple[str, str], ...] = (
    ("doc_id", "string"), ("source", "string"), ("excerpt_start", "long"), ("excerpt_end", "long"),
    ("template_id", "string"), ("template_hash", "string"), ("stage", "string"), ("kind", "string"),
    ("model_name", "string"), ("model_version", "string"), ("model_uri", "string"),
    ("sampling", "string"), ("seed", "long"), ("sample_index", "long"),
    ("input_table", "string"), ("input_version", "long"),
)
SAMPLE_CONTENT: tuple[tuple[str, str], ...] = (
    ("text", "string"), ("problem", "string"), ("solution", "string"), ("answer", "string"),
    ("code_output", "string"), ("copy_containment", "double"), ("finish_reason", "string"),
    ("prompt_tokens", "long"), ("completion_tokens", "long"),
)


@dataclass(frozen=True)
class Table:
    layer: str
    name: str
    columns: tuple[tuple[str, str], ...]
    merge_keys: tuple[str, ...]
    description: str
    partition_by: tuple[str, ...] = ()
    cluster_by: tuple[str, ...] = ()
    properties: dict[str, str] = field(default_factory=dict)

    @property
    def full_name(self) -> str:
        return f"{self.layer}.{self.name}"

    @property
    def column_names(self) -> list[str]:
        return [name for name, _ in self.columns]

    def uri(self, settings: Settings) -> str:
        return f"{settings.lake_root.rstrip('/')}/{self.layer}/{self.name}"

    def spark_schema(self) -> StructType:
        from pyspark.sql import types as T

        return T.StructType([T.StructField(n, _spark_type(t), True) for n, t in self.columns])

    def arrow_schema(self) -> pa.Schema:
        import pyarrow as pa

        return pa.schema([pa.field(n, _arrow_type(t), nullable=True) for n, t in self.columns])

    def merge_condition(self, target: str = "t", source: str = "s") -> str:
        return " AND ".join(f"{target}.`{k}` <=> {source}.`{k}`" for k in self.merge_keys)


def _spark_type(name: str) -> Any:
    from pyspark.sql import types as T

    scalars = {
        "string": T.StringType(), "long": T.LongType(), "int": T.IntegerType(),
        "double": T.DoubleType(), "boolean": T.BooleanType(), "timestamp": T.TimestampType(),
        "binary": T.BinaryType(),
    }
    if name in scalars:
        return scalars[name]
    if name.startswith("array<"):
        return T.ArrayType(_spark_type(name[6:-1]), True)
    if name.startswith("map<"):
        key, value = name[4:-1].split(",")
        return T.MapType(_spark_type(key), _spark_type(value), True)
    raise ValueError(f"unknown column type {name!r}")


def _arrow_type(name: str) -> Any:
    import pyarrow as pa

    scalars = {
        "string": pa.string(), "long": pa.int64(), "int": pa.int32(), "double": pa.float64(),
        "boolean": pa.bool_(), "timestamp": pa.timestamp("us", tz="UTC"), "binary": pa.binary(),
    }
    if name in scalars:
        return scalars[name]
    if name.startswith("array<"):
        return pa.list_(_arrow_type(name[6:-1]))
    if name.startswith("map<"):
        key, value = name[4:-1].split(",")
        return pa.map_(_arrow_type(key), _arrow_type(value))
    raise ValueError(f"unknown column type {name!r}")


def _t(layer: str, name: str, keys: tuple[str, ...], description: str,
       *columns: tuple[str, str], **kw: Any) -> Table:
    return Table(layer, name, tuple(columns), keys, description, **kw)


TABLES: tuple[Table, ...] = (
    # ---- bronze: raw records as ingested -------------------------------------------------
    _t("bronze", "documents", ("doc_id",), "Raw documents, one per source record",
       ("doc_id", "string"), ("source", "string"), ("native_id", "string"), ("text", "string"),
       ("markup", "string"), ("metadata", "map<string,string>"), ("content_sha256", "string"),
       ("byte_size", "long"), ("file", "string"), ("line", "long"), RUN_ID,
       ("ingested_at", "timestamp"), partition_by=("source",)),
    _t("bronze", "quarantine", ("file", "line"), "Records that could not be ingested, with why",
       ("file", "string"), ("line", "long"), ("source", "string"), ("reason", "string"),
       ("detail", "string"), ("raw_sample", "string"), ("byte_size", "long"), RUN_ID,
       ("quarantined_at", "timestamp")),
    _t("bronze", "ingested_files", ("file",), "Input files already read (size, mtime) for incremental runs",
       ("file", "string"), ("source", "string"), ("size", "long"), ("mtime", "double"),
       ("records", "long"), RUN_ID),
    # ---- silver: cleaned, scored, deduplicated ---------------------------------------------
    _t("silver", "documents", ("doc_id",), "Cleaned documents that passed the quality filters",
       ("doc_id", "string"), ("source", "string"), ("text", "string"), ("text_hash", "string"),
       ("n_words", "long"), ("n_chars", "long"), ("quality_score", "double"),
       ("math_density", "double"), ("metrics", "map<string,double>"), ("bronze_version", "long"),
       RUN_ID),
    _t("silver", "dropped", ("doc_id",), "Documents the cleaning filters removed, with every reason",
       ("doc_id", "string"), ("source", "string"), ("reasons", "array<string>"),
       ("primary_reason", "string"), ("metrics", "map<string,double>"), ("n_words", "long"),
       ("bronze_version", "long"), RUN_ID),
    _t("silver", "minhash_signatures", ("doc_id",), "MinHash signature per silver document (incremental dedup)",
       ("doc_id", "string"), ("text_hash", "string"), ("signature", "array<long>"),
       ("band_hashes", "array<long>"), RUN_ID),
    _t("silver", "duplicate_edges", ("doc_a", "doc_b"), "Verified duplicate pairs (doc_a < doc_b)",
       ("doc_a", "string"), ("doc_b", "string"), ("kind", "string"), ("similarity", "double"), RUN_ID),
    _t("silver", "duplicate_clusters", ("doc_id",), "Every member of a duplicate cluster and its survivor",
       ("doc_id", "string"), ("cluster_id", "string"), ("survivor_doc_id", "string"),
       ("is_survivor", "boolean"), ("kind", "string"), ("cluster_size", "long"), RUN_ID),
    _t("silver", "dedup", ("doc_id",), "Silver documents minus non-surviving duplicates",
       ("doc_id", "string"), ("source", "string"), ("text", "string"), ("quality_score", "double"),
       ("math_density", "double"), ("n_words", "long"), RUN_ID),
    # ---- gold: decontaminated corpus and everything downstream ------------------------------
    _t("gold", "contamination", ("doc_id", "benchmark", "item_id"), "Benchmark overlaps found in documents",
       ("doc_id", "string"), ("benchmark", "string"), ("item_id", "string"), ("rule", "string"),
       ("matched_ngram", "string"), ("containment", "double"), RUN_ID,
       # evidence: the matched span (document character offsets [start, end); matched_ngram is
       # its text) and the share of the item it reproduces; containment: share found anywhere
       ("coverage", "double"), ("span_start", "long"), ("span_end", "long")),
    _t("gold", "corpus", ("doc_id",), "Clean, deduplicated, decontaminated corpus",
       ("doc_id", "string"), ("source", "string"), ("text", "string"), ("quality_score", "double"),
       ("math_density", "double"), ("n_words", "long"), RUN_ID),
    # ---- generation ledgers: one row per request key (models/generation/ledger.py) ----------
    _t("gold", "kd_requests", ("key",), "Teacher request ledger: one row per request key, exactly-once",
       *LEDGER_COLUMNS, partition_by=("key_bucket",)),
    _t("gold", "synthetic_requests", ("key",), "Mass-synthesis request ledger (same schema as kd_requests)",
       *LEDGER_COLUMNS, partition_by=("key_bucket",)),
    # ---- distillation and synthesis outputs (models/distil.py, models/synthesize.py) ----------
    # ``round``: the KD round that first asked for the sample (initialize | boost; null before rounds)
    _t("gold", "kd_dataset", ("request_key",),
       "Accepted teacher samples in the training format (## Question / ## Solution | ## Code Solution)",
       ("request_key", "string"), *SAMPLE_CONTENT, *SAMPLE_LINEAGE, RUN_ID, ("created_at", "timestamp"),
       ("round", "string")),
    _t("gold", "kd_rejected", ("request_key",), "Teacher replies that failed parsing/validation, with why",
       ("request_key", "string"), ("reason", "string"), ("detail", "string"), ("response", "string"),
       *SAMPLE_CONTENT, *SAMPLE_LINEAGE, RUN_ID, ("created_at", "timestamp"), ("round", "string")),
    _t("gold", "synthetic_raw", ("request_key",),
       "Every synthesizer reply, parsed; reason is null when it parsed and validated",
       ("request_key", "string"), ("reason", "string"), ("detail", "string"), *SAMPLE_CONTENT,
       *SAMPLE_LINEAGE, ("shard_index", "long"), ("num_shards", "long"), RUN_ID,
       ("created_at", "timestamp")),
    _t("gold", "synthetic_problems", ("request_key",),
       "Synthetic problems after filtering, exact/near dedup and benchmark decontamination",
       ("request_key", "string"), ("text", "string"), ("problem", "string"), ("solution", "string"),
       ("answer", "string"), ("problem_hash", "string"), ("near_dup_cluster", "string"),
       *SAMPLE_LINEAGE, ("synthesis_run_id", "string"), ("raw_version", "long"), RUN_ID),
    # run_id = the filter run; synthesis_run_id = the `jzlake synthesize` run that wrote the raw row
    _t("gold", "synthetic_dropped", ("request_key",),
       "Synthetic replies the filter removed: parse reason, length, duplicate or contamination",
       ("request_key", "string"), ("reason", "string"), ("detail", "string"),
       ("duplicate_of", "string"), ("benchmark", "string"), *SAMPLE_LINEAGE,
       ("synthesis_run_id", "string"), ("raw_version", "long"), RUN_ID),
    # ---- evaluation (models/eval): one row per (model version, benchmark spec, item) -----------
    # spec_hash fixes benchmark file, setting, prompt, decoding, extraction and grader; a rerun
    # of the same version and spec rewrites identical rows (MERGE adds nothing).
    _t("gold", "eval_predictions", ("model_name", "model_version", "spec_hash", "item_id"),
       "Per-item evaluation results: prediction, extracted answer, correct, rounds, error",
       ("model_name", "string"), ("model_version", "string"), ("spec_hash", "string"),
       ("benchmark", "string"), ("setting", "string"), ("item_id", "string"), ("prediction", "string"),
       ("extracted_answer", "string"), ("reference_answer", "string"), ("correct", "boolean"),
       ("rounds_used", "long"), ("finish_reason", "string"), ("error", "string"), RUN_ID),
    # ---- LESS influence selection (models/influence) ----------------------------------------
    # One row per (run, document): runs are content-addressed (config + model + input version),
    # so a rerun rewrites identical rows and other configurations keep their own scores.
    _t("gold", "influence_scores", ("run_id", "doc_id"),
       "LESS influence score per candidate document (max over subtasks of mean cosine)",
       ("doc_id", "string"), ("score", "double"), ("subtask_scores", "map<string,double>"),
       ("n_units", "long"), ("candidate_unit", "string"), ("checkpoints", "array<string>"),
       ("checkpoint_weights", "array<double>"), ("model", "string"), ("projection_seed", "long"),
       ("projection_dim", "long"), ("input_table", "string"), ("input_version", "long"),
       ("shard_index", "long"), ("num_shards", "long"), RUN_ID),
    # The current selection: MERGE upserts the latest run's picks and deletes the rest (history
    # stays in the Delta log); consumers (distillation) read it without knowing a run id.
    _t("gold", "selected_texts", ("doc_id",),
       "Documents picked by the latest influence run, ranked, with the excerpt that was scored",
       ("rank", "long"), ("doc_id", "string"), ("score", "double"), ("source", "string"),
       ("excerpt", "string"), ("excerpt_start", "long"), ("excerpt_end", "long"),
       ("input_table", "string"), ("input_version", "long"), RUN_ID),
)

_BY_NAME = {t.full_name: t for t in TABLES}


def table(full_name: str) -> Table:
    """Look up a table by ``layer.name``; the error lists what exists."""
    try:
        return _BY_NAME[full_name]
    except KeyError:
        known = ", ".join(sorted(_BY_NAME))
        raise KeyError(f"no table {full_name!r} in the catalogue; known tables: {known}") from None


def all_tables() -> list[Table]:
    return list(_BY_NAME.values())
