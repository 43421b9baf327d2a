"""Typed settings for the whole lake: one object, loaded once, passed down.

Load order (later wins): packaged ``defaults.yaml`` → a user YAML file (``--config`` or
``JZLAKE_CONFIG``) → environment (``JZLAKE__SECTION__FIELD=value``, plus the conventional
``SPARK_MASTER`` and ``MLFLOW_TRACKING_URI``) → explicit overrides from the CLI.

No other module reads environment variables for configuration: they receive a ``Settings``.
Relative paths are resolved against ``home`` (the repository root in a checkout, else the
current directory, or ``JZLAKE_HOME``).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULTS_FILE = PACKAGE_DIR / "defaults.yaml"
ENV_PREFIX = "JZLAKE__"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FieldMapping(_Section):
    """How one source's records become documents.

    Paths are dotted (``question.body_html``); ``[]`` flattens a list (``answers[].body_html``).
    A string value that holds a JSON or Python-literal dict is parsed when the path goes into it.
    """

    id: str | None = "id"
    text: list[str] = Field(default_factory=lambda: ["text"])
    markup: Literal["text", "html", "markdown", "latex"] = "text"
    metadata: dict[str, str] = Field(default_factory=dict)


class SourceSettings(_Section):
    glob: str
    format: Literal["auto", "jsonl", "parquet"] = "auto"
    mapping: FieldMapping = Field(default_factory=FieldMapping)


class BenchmarkSettings(_Section):
    """One evaluation set to decontaminate against (and later to evaluate on).

    With ``text_fields`` unset, ``question`` or ``problem`` is used (SVAMP-style ``Body`` +
    ``Question`` too); ``id_field`` unset means the row index (the key for a JSON object of
    items). ``answer_extractor``: ``auto`` takes the text after ``####`` (GSM8K) when present and
    the last ``\\boxed{}`` of ``solution`` when there is no answer field (MATH); ``last_boxed`` /
    ``after_hashes`` force one rule on ``answer_field``; ``raw`` keeps the field as it is.
    See ``jzlake.benchmarks``.
    """

    path: str
    text_fields: list[str] | None = None
    id_field: str | None = None
    answer_field: str | None = None
    answer_extractor: Literal["auto", "raw", "last_boxed", "after_hashes"] = "auto"


class LakeSettings(_Section):
    root: str = "var/lake"
    # Run summaries and curation reports; default ``<root>/_runs`` so they travel with the lake.
    runs_dir: str | None = None


class SparkSettings(_Section):
    master: str = "local[*]"
    app_name: str = "jiuzhang-lake"
    jars_dir: str = "var/jars"
    shuffle_partitions: int = 8
    driver_memory: str = "3g"
    # Executors' Python. None: this interpreter when the master runs on this host (local[*], a
    # standalone master on loopback), else the cluster's own (the image's `python3`).
    executor_python: str | None = None
    # Ship jzlake + spark_jobs to executors as a zip (spark.submit.pyFiles). None: only when the
    # master is on another host; false when the executor image already has the project installed.
    ship_code: bool | None = None
    conf: dict[str, str] = Field(default_factory=dict)


class IngestSettings(_Section):
    max_doc_bytes: int = 5_000_000
    raw_sample_chars: int = 1000


class CleanSettings(_Section):
    min_words: int = 50
    max_words: int = 200_000
    min_mean_word_length: float = 2.0
    max_mean_word_length: float = 12.0
    # Math pages are symbol-heavy: the Gopher 0.1 symbol/word cap and the C4 "{" rule would
    # drop most LaTeX, so symbols are counted outside math spans only (see transforms.quality).
    max_symbol_word_ratio: float = 0.1
    min_alpha_word_fraction: float = 0.5
    max_duplicate_line_fraction: float = 0.3
    max_duplicate_paragraph_fraction: float = 0.3
    max_top_2gram_fraction: float = 0.2
    max_top_3gram_fraction: float = 0.18
    max_top_4gram_fraction: float = 0.16
    # Gopher uses 0.15 for web pages; math exposition repeats defining phrases ("is a variable
    # assignment for"). On the shared raw corpus 0.15 dropped 23 of 1 508 substantive documents
    # (mostly clean OpenLogic sections), 0.20 drops 8.
    max_dup_5gram_fraction: float = 0.2
    # Gopher's stop-word rule (the, be, to, of, and, that, have, with; counted outside math): a
    # page of LaTeX macro definitions or build options has none; any real math page has plenty.
    min_stopwords: int = 2
    max_bullet_line_fraction: float = 0.9
    max_ellipsis_line_fraction: float = 0.3
    min_math_density: float | None = None


class DedupSettings(_Section):
    """MinHash LSH near-dedup (see ``spark_jobs.transforms.minhash`` and ``benchmarks/bench_curation``).

    20 bands × 6 rows make a pair at Jaccard 0.8 a candidate with probability 0.998 (0.3: 0.015).
    ``verify: exact`` rejects candidates whose 128-permutation estimate is > 4σ below the threshold
    and decides the rest on the exact Jaccard of their shingle sets (on a 5k-document benchmark
    run, estimate-only verification measured F1 0.93, its errors all near the threshold; exact:
    1.00); ``estimate`` decides on the MinHash estimate alone.
    """

    shingle_words: int = 5
    num_perm: int = 128
    bands: int = 20
    rows_per_band: int = 6
    jaccard_threshold: float = 0.8
    verify: Literal["exact", "estimate"] = "exact"
    seed: int = 42

    @field_validator("rows_per_band")
    @classmethod
    def _bands_fit(cls, rows: int, info: Any) -> int:
        bands = info.data.get("bands", 0)
        perms = info.data.get("num_perm", 0)
        if bands * rows > perms:
            raise ValueError(f"bands × rows_per_band = {bands * rows} exceeds num_perm = {perms}")
        return rows


class DecontamSettings(_Section):
    """Benchmark overlap rules (measured choices: see ``spark_jobs.decontaminate``)."""

    # Per item, scaled to its length (spark_jobs.transforms.ngrams.DecontamRules says each one).
    ngram: int = 13                  # long items: a shared 13-gram is evidence
    long_item_tokens: int = 25
    short_ngram: int = 4             # every item: its 4-grams locate the best span of a document
    min_coverage: float = 0.65       # share of the item the span reproduces in order
    min_evidence_tokens: int = 5     # ... with this many item tokens under non-stop prose grams
    template_coverage: float = 0.8   # no evidence gram (template-only item): a near-whole copy
    template_min_tokens: int = 10
    min_candidate_coverage: float = 0.3
    span_slack: float = 1.5
    edit_gap: int = 3
    min_block: int = 2
    min_item_tokens: int = 10
    # A prose gram: at least this share of words (≥ 2 letters; numbers and LaTeX commands are
    # not): formula soup like "frac x 2 a 2 frac y 2" is not evidence of a leak.
    min_word_fraction: float = 0.5
    # Stop grams (no evidence alone): in more than this many benchmark item texts ("let f be
    # the function defined by"), or in max_doc_share of the documents checked (≥ min_doc_count).
    max_items_per_gram: int = 4
    max_doc_share: float = 0.002
    min_doc_count: int = 20


class GpuKubernetesSettings(_Section):
    """Pod shape for the ``kubernetes`` GPU backend (``plugins/gpu_backends.py``)."""

    kubernetes_conn_id: str = "kubernetes_default"
    gpu_resource: str = "nvidia.com/gpu"
    node_selector: dict[str, str] = Field(default_factory=lambda: {"nvidia.com/gpu.present": "true"})
    tolerations: list[dict[str, str]] = Field(default_factory=lambda: [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}])
    shm_size: str = "16Gi"          # memory-backed /dev/shm (NCCL, DataLoader workers)
    service_account: str | None = None
    image_pull_policy: str = "IfNotPresent"
    startup_timeout_s: int = 900
    on_finish_action: str = "delete_succeeded_pod"
    # A PVC mounted at the same path as settings.home when the lake/runs are local paths.
    shared_volume_claim: str | None = None


class GpuSettings(_Section):
    """Where GPU jobs run (``plugins/gpu_job.py``) and where their shard markers/staging live."""

    backend: Literal["local", "kubernetes"] = "local"
    image: str = "jiuzhang-lake/gpu:latest"
    namespace: str = "jiuzhang"
    markers_dir: str = "var/markers"
    # Per-shard staged outputs before the MERGE (models/lake_io.py); default <lake root>/_staging.
    staging_dir: str | None = None
    python: str | None = None       # interpreter for the local backend (default: the worker's)
    timeout_s: int = 6 * 3600
    kill_grace_s: float = 20.0      # SIGTERM → SIGKILL of the job's process group
    log_tail_lines: int = 40        # stderr lines quoted in a failed task's error
    kubernetes: GpuKubernetesSettings = Field(default_factory=GpuKubernetesSettings)


class ModelSettings(_Section):
    cache_dir: str = "var/models"
    tiny_model_dir: str = "var/models/tiny-llama"
    # Real checkpoints for GPU deployments (not reachable from CI machines).
    reference_model: str = "meta-llama/Meta-Llama-3-8B"
    synthesizer_base: str = "deepseek-ai/deepseek-math-7b-rl"


class MlflowSettings(_Section):
    tracking_uri: str = "sqlite:///var/mlflow/mlflow.db"
    artifact_root: str = "var/mlflow/artifacts"
    experiment: str = "jiuzhang-lake"
    # Registered models up to this size are logged as run artifacts; larger ones are registered
    # by reference (a sha256 manifest, weights left where the job wrote them): models/registry.py.
    artifact_max_bytes: int = 256 * 1024 * 1024


class AirflowSettings(_Section):
    """How DAGs submit and retry lake jobs (see ``plugins/spark_submit.py``)."""

    # Spark master comes from this connection: AIRFLOW_CONN_SPARK_DEFAULT='spark://host:7077'.
    spark_conn_id: str = "spark_default"
    retries: int = 2
    retry_delay_s: int = 300
    home: str = "var/airflow"     # AIRFLOW_HOME for `make airflow-up` / `python -m plugins.airflow_local`
    api_port: int = 18100


# Delta's own safety net (spark.databricks.delta.retentionDurationCheck) refuses less: a shorter
# VACUUM deletes files that a pinned reader or a running writer still needs.
MIN_VACUUM_RETENTION_HOURS = 168


class MaintenanceSettings(_Section):
    """Daily lake maintenance (``spark_jobs/maintenance.py``, DAG ``lake_maintenance``)."""

    vacuum_retention_hours: float = MIN_VACUUM_RETENTION_HOURS
    optimize: bool = True                # OPTIMIZE (bin-packing compaction) of every non-ledger table
    # Generation ledgers (written by delta-rs, many small commits) are compacted above this file count.
    ledger_compact_above_files: int = Field(default=64, ge=1)

    @field_validator("vacuum_retention_hours")
    @classmethod
    def _at_least_a_week(cls, hours: float) -> float:
        if hours < MIN_VACUUM_RETENTION_HOURS:
            raise ValueError(f"maintenance.vacuum_retention_hours = {hours} is below {MIN_VACUUM_RETENTION_HOURS} "
                             "(7 days): VACUUM would delete files that pinned readers and running writers "
                             f"still need; set it to {MIN_VACUUM_RETENTION_HOURS} or more")
        return hours


class Bounds(_Section):
    """Allowed range of one data-quality metric; ``None`` leaves that side open."""

    min: float | None = None
    max: float | None = None


class QualitySettings(_Section):
    """Data-quality checks that fail a DAG run (``plugins/quality.py``): stage → metric → bounds.

    Metrics of a stage: the numbers in its summary (``input``, ``kept``, ``contaminated``, ...),
    ``kept_fraction`` (kept / input, when input > 0) and ``rows.<layer>.<name>`` (rows of a table).
    """

    enabled: bool = True
    stages: dict[str, dict[str, Bounds]] = Field(default_factory=lambda: {
        "decontaminate": {"kept_fraction": Bounds(min=0.8), "rows.gold.corpus": Bounds(min=1)},
    })


class ModelPrice(_Section):
    """List price of one model in USD per 1M tokens (check the provider's page before a paid run)."""

    input_per_1m: float = 0.0
    output_per_1m: float = 0.0


class GenerationBudget(_Section):
    """Hard caps for one ledger, checked before each request is sent (``None`` = no cap).

    Caps cover everything the ledger has recorded, so a resumed run does not get a fresh allowance.
    """

    max_calls: int | None = None
    max_tokens: int | None = None
    max_usd: float | None = None


class VllmSettings(_Section):
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None
    dtype: str = "auto"
    enforce_eager: bool = False


class GenerationSettings(_Section):
    """LLM endpoints, retries, budgets and prices (see ``models/generation``).

    The API key is never stored here: ``api_key_env`` names an environment variable and
    ``api_key_conn_id`` an Airflow connection whose password is the key (the connection wins).
    """

    backend: Literal["openai", "openai-batch", "vllm", "transformers"] = "openai"
    base_url: str = "http://127.0.0.1:18300/v1"
    api_key_env: str | None = "OPENAI_API_KEY"
    api_key_conn_id: str | None = None
    teacher_model: str = "gpt-4o-2024-08-06"
    synthesizer_model: str = "jiuzhang-synthesizer"
    # logical model name (ledger key, prices) -> name the server expects (a local server wants its path)
    served_models: dict[str, str] = Field(default_factory=dict)
    concurrency: int = 8
    request_timeout_s: float = 120.0
    max_retries: int = 6
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    max_retry_after_s: float = 300.0
    max_tokens_param: Literal["max_tokens", "max_completion_tokens"] = "max_tokens"
    # ledger durability: flush every N responses or T seconds, whichever comes first
    ledger_flush_every: int = 32
    ledger_flush_seconds: float = 5.0
    # write-through: a durable "sending" row before every send and every answer committed before
    # its worker slot sends again; auto = on for models with a non-zero price in ``prices`` (paid
    # teachers), off for free/unpriced ones (buffered, faster). A priced model, a remote
    # (non-loopback) base_url or an API key in use is always written through, whatever this says
    # (``false`` is then overridden with a warning: a loopback gateway can front a paid API).
    ledger_write_through: bool | Literal["auto"] = "auto"
    # sends of one key that may end in failure before it is marked ``abandoned`` (never re-sent)
    max_attempts_per_key: int = Field(default=3, ge=1)
    # write-through and Batch claims: a key held by a run whose liveness cannot be known (another
    # host or PID namespace) becomes claimable this long after its claim's last renewal (renewed every
    # lease/3 while requests are in flight); a claimant provably alive on this host is never taken
    # over. Must be at least ``request_timeout_s`` (a run refuses to start otherwise).
    ledger_lease_s: float = Field(default=900.0, gt=0)
    # a ledger commit that keeps conflicting is retried (exponential backoff, jitter) this long;
    # an answer that still cannot be committed is spilled to disk and committed on the next start
    ledger_commit_deadline_s: float = Field(default=60.0, gt=0)
    batch_poll_interval_s: float = 60.0
    batch_max_requests: int = 50_000
    batch_price_factor: float = 0.5      # the Batch API bills half the list price
    transformers_device: str = "auto"
    transformers_batch_size: int = 8
    vllm: VllmSettings = Field(default_factory=VllmSettings)
    teacher_budget: GenerationBudget = Field(default_factory=lambda: GenerationBudget(max_calls=9300))
    synthesis_budget: GenerationBudget = Field(default_factory=GenerationBudget)
    prices: dict[str, ModelPrice] = Field(default_factory=dict)


class PromptSettings(_Section):
    """Excerpts and synthesis prompts (``models/generation/prompt_library.py``, ``excerpts.py``)."""

    templates_dir: str | None = None  # default: the packaged models/generation/prompts/
    stages: list[str] = Field(default_factory=lambda: [
        "cot_grade_school", "cot_middle_school", "cot_high_school", "cot_college",
        "cot_amc8", "cot_amc10", "cot_amc12", "cot_aime"])
    # random: one stage per document drawn by RNG(seed, doc_id); all: every stage per document
    stage_selection: Literal["random", "all"] = "random"
    all_stages_sources: list[str] = Field(default_factory=list)  # sources that get every stage
    tool_fraction: float = 0.25  # share of documents that also get the code-solution prompt
    seed: int = 42
    min_excerpt_chars: int = 200  # shorter excerpts (LaTeX wrapper files) are skipped, counted
    copy_ngram: int = 6
    max_copy_containment: float = 0.5  # problem n-grams found in the excerpt → copies_excerpt


class SamplingSettings(_Section):
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 2500


class SandboxSettings(_Section):
    """Limits for running model-written code (``models/sandbox.py``)."""

    cpu_seconds: int = 5
    wall_seconds: float = 10.0
    memory_mb: int = 1024
    max_output_kb: int = 64
    network_isolation: Literal["auto", "netns", "audit-hook"] = "auto"
    filesystem_isolation: Literal["auto", "mount", "audit-hook"] = "auto"  # read-only mount namespace
    # Without bubblewrap (or with bubblewrap only as root) the sandbox refuses to run; true accepts
    # the weaker modes (bwrap-root, unshare namespaces + audit hook)
    allow_weak_isolation: bool = False
    max_disk_mb: int = 64  # the run's writable tmpfs (memory, counted in its cgroup where it has one)


class RoundCalls(_Section):
    """Teacher calls one KD round may spend (``None``: whatever ``generation.teacher_budget`` leaves)."""

    initialize: int | None = Field(default=4650, ge=0)
    boost: int | None = Field(default=None, ge=0)


class DistilSettings(_Section):
    """Teacher distillation (``jzlake distil``, ``models/distil.py``), in two KD rounds.

    ``round``: ``initialize`` distils a seeded random sample (``initialize_documents``,
    ``initialize_seed``) of ``gold.corpus``; ``boost`` distils ``gold.selected_texts`` (the
    influence pick); ``auto`` = boost when the selection exists, else initialize.
    ``input_table`` (legacy) forces the table, and with it the round. ``round_max_calls`` splits
    ``generation.teacher_budget`` (9,300 calls) between rounds. Paper defaults per kind: CoT
    temperature 1.0, tool 0.1 / top-p 0.95.
    """

    round: Literal["auto", "initialize", "boost"] = "auto"
    initialize_documents: int = Field(default=4000, ge=1)
    initialize_seed: int = 42
    round_max_calls: RoundCalls = Field(default_factory=RoundCalls)
    input_table: Literal["auto", "gold.selected_texts", "gold.corpus"] = "auto"
    max_documents: int | None = None
    # auto: generation.teacher_model when an API key resolves, else the local model (said so)
    teacher: Literal["auto", "configured", "local"] = "auto"
    local_teacher_model: str = "tiny-llama"
    samples_per_prompt: int = 1
    cot_sampling: SamplingSettings = Field(default_factory=SamplingSettings)
    tool_sampling: SamplingSettings = Field(
        default_factory=lambda: SamplingSettings(temperature=0.1, top_p=0.95))


class SynthesisSettings(_Section):
    """Mass synthesis (``jzlake synthesize``, ``models/synthesize.py``) and its Spark filter.

    ``model``: a local model directory, an MLflow ``models:/name@alias`` URI or a name served by
    ``generation.base_url``. Unset: the registry's ``registered_model@champion``, else
    ``@challenger`` when ``allow_challenger`` (until the evaluation gate promotes a champion),
    else an error naming ``jzlake train synthesizer``.
    """

    model: str | None = None
    registered_model: str = "jiuzhang-synthesizer"
    allow_challenger: bool = False
    num_shards: int = 1
    max_documents_per_shard: int | None = None
    samples_per_prompt: int = 1
    cot_sampling: SamplingSettings = Field(default_factory=SamplingSettings)
    tool_sampling: SamplingSettings = Field(
        default_factory=lambda: SamplingSettings(temperature=0.1, top_p=0.95))
    min_problem_words: int = 8
    max_problem_words: int = 600
    max_solution_words: int = 2000


class InfluenceTargetSettings(_Section):
    """One target benchmark for LESS: examples in the training format, grouped into subtasks."""

    path: str
    question_field: str = "question"
    solution_field: str = "answer"
    subtask_field: str | None = None   # e.g. MATH's ``subject``: one subtask per value


class InfluenceSettings(_Section):
    """LESS influence selection (``models/influence``). Defaults suit the tiny model; LESS used
    r=128, α=512, dropout 0.1 on q/k/v/o and lr 2e-5 for 7B models."""

    model: str | None = None            # None: the tiny local model; else an HF dir or models:/ URI
    input_table: str = "gold.corpus"
    candidate_unit: Literal["excerpt", "pair"] = "excerpt"
    # candidate_unit=pair: (prompt, generated problem–solution) rows; score goes to the source doc
    pairs_table: str | None = None
    pairs_path: str | None = None       # Parquet/JSONL alternative to pairs_table
    pair_columns: dict[str, str] = Field(default_factory=lambda: {
        "doc_id": "doc_id", "prompt": "prompt", "completion": "completion"})
    excerpt_chars: int = 1000
    max_seq_len: int = 512
    seed: int = 42
    warmup_fraction: float = 0.05
    warmup_min_examples: int = 8
    warmup_epochs: int = 4
    warmup_batch_size: int = 8
    warmup_lr: float = 1e-3
    warmup_ratio: float = 0.03          # linear warm-up share of the steps, then linear decay
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    lora_r: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    lora_target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    projection_dim: int = 8192
    projection_seed: int = 0
    projection_block_rows: int = 4096   # parameter rows per generated Rademacher block
    projection_cache_mb: int = 512      # keep generated blocks when they fit, else regenerate
    grad_chunk_size: int = 16           # examples per batched gradient call: bounds activation memory
    projection_batch_mb: int = 256      # preconditioned gradients buffered per pass over R (compute-bound)
    targets: dict[str, InfluenceTargetSettings] = Field(default_factory=dict)
    targets_per_subtask: int = 4
    top_fraction: float | None = 0.05
    top_k: int | None = None
    num_shards: int = 1
    device: str = "auto"                # auto: cuda when available, else cpu
    gradient_method: Literal["factored", "vmap"] = "factored"   # same numbers; factored is faster
    torch_threads: int | None = None    # CPU threads (None: torch's default)


class TrainRecipe(_Section):
    """Optimisation settings of one training run on one kind of device (``models/train``)."""

    base_model: str | None = None       # HF dir, hub name or models:/ URI; None: the tiny local model
    method: Literal["full", "lora"] = "full"
    learning_rate: float = 1e-5         # peak of the WSD schedule
    epochs: int = 1
    global_batch_size: int = 32         # sequences (packed rows when packing) per optimizer step
    micro_batch_size: int = 1           # sequences per forward pass per process (gradient accumulation)
    max_length: int = 2048
    precision: Literal["bf16", "fp32"] = "bf16"
    warmup_ratio: float = 0.03          # WSD: linear warm-up over this share of the steps,
    decay_start: float = 0.85           # constant until this share, then linear decay
    min_lr_ratio: float = 0.1           # to this fraction of the peak at the last step
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    packing: bool = True
    # auto: position ids restarting per sample (block-diagonal / varlen attention in transformers);
    # explicit: a 4-D block-diagonal mask, for attention implementations that do not detect packing
    packing_mask: Literal["auto", "explicit"] = "auto"
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


def _tiny_recipe(**changes: Any) -> TrainRecipe:
    return TrainRecipe(**{"learning_rate": 2e-3, "epochs": 3, "global_batch_size": 8, "micro_batch_size": 4,
                          "max_length": 1024, "precision": "fp32", **changes})


class TrainJobSettings(_Section):
    """One training job (``jzlake train synthesizer|jiuzhang``): GPU defaults = the paper's,
    CPU defaults fit the tiny model; ``device`` picks the recipe (auto: cuda when available)."""

    registered_model: str
    device: str = "auto"
    gpu: TrainRecipe = Field(default_factory=TrainRecipe)
    cpu: TrainRecipe = Field(default_factory=_tiny_recipe)
    seed: int = 42
    input_version: int | None = None    # pin the input table's Delta version (None: latest)
    checkpoint_every: int = 50          # optimizer steps between checkpoints
    keep_checkpoints: int = 2
    register_version: bool = True       # False: train and save only (no MLflow registration)
    alias: str = "challenger"
    torch_threads: int | None = None


class SynthesizerTrainSettings(TrainJobSettings):
    """Synthesizer fine-tuning on ``gold.kd_dataset`` (+ the optional GSM8K format seed)."""

    registered_model: str = "jiuzhang-synthesizer"
    gpu: TrainRecipe = Field(default_factory=lambda: TrainRecipe(
        base_model="deepseek-ai/deepseek-math-7b-rl", epochs=5))
    # the tiny model learns the reply format only with a high lr and many passes (measured: see
    # defaults.yaml's format seed; 4 epochs of batch 4 left every reply unparsable)
    cpu: TrainRecipe = Field(default_factory=lambda: _tiny_recipe(
        learning_rate=1e-2, epochs=10, global_batch_size=8, micro_batch_size=4))
    # Real GSM8K train pairs rendered through the education-stage prompts; on only when set.
    format_seed: bool = False
    format_seed_paths: list[str] = Field(default_factory=lambda: ["data/sample/benchmarks/gsm8k/train*.jsonl"])
    format_seed_samples: int = 64
    # Only pairs whose question + solution fit in this many characters (None: any): on the tiny
    # model short pairs teach the reply format in far fewer tokens (see defaults.yaml, measured).
    format_seed_max_chars: int | None = Field(default=None, gt=0)


class JiuzhangTrainSettings(TrainJobSettings):
    """JiuZhang training: ``gold.synthetic_problems`` (CPT, seeded shuffle) then SFT sources, one run."""

    registered_model: str = "jiuzhang-math"
    gpu: TrainRecipe = Field(default_factory=lambda: TrainRecipe(base_model="deepseek-ai/deepseek-math-7b-base"))
    cpu: TrainRecipe = Field(default_factory=lambda: _tiny_recipe(epochs=1))
    # JSONL globs with question/answer (GSM8K) or problem/solution (MATH) rows, in this order.
    sft_sources: list[str] = Field(default_factory=lambda: ["data/sample/benchmarks/gsm8k/train*.jsonl"])
    max_sft_samples: int | None = None


class TrainSettings(_Section):
    synthesizer: SynthesizerTrainSettings = Field(default_factory=SynthesizerTrainSettings)
    jiuzhang: JiuzhangTrainSettings = Field(default_factory=JiuzhangTrainSettings)


class GateThresholds(_Section):
    """Promotion gate of an evaluated model (``models/eval/gate.py``). ``floors``: minimum accuracy
    per ``benchmark/setting`` (or ``benchmark`` for both settings); each key is also a required
    result. Non-inferiority: the paired-bootstrap lower bound of (challenger − champion)
    accuracy on shared items must be ≥ −``non_inferiority_margin``."""

    floors: dict[str, float] = Field(default_factory=dict)
    non_inferiority_margin: float = 0.02
    confidence: float = 0.95            # one-sided, for the paired bootstrap
    bootstrap_samples: int = 2000
    max_extraction_failure_rate: float = 1.0
    max_execution_error_rate: float = 1.0
    max_truncation_rate: float = 1.0


class SynthesizerGateThresholds(_Section):
    """Promotion gate of a synthesizer: what matters for a data generator (metrics logged on the
    version's run by synthesis/filter/training: ``synth.valid_rate``, ``synth.contaminated_rate``,
    ``kd.heldout_loss``)."""

    min_valid_rate: float = 0.5         # parsed + validated share of sampled problems
    max_contaminated_rate: float = 0.05  # share flagged by benchmark decontamination
    max_heldout_kd_loss: float | None = None


class EvalSettings(_Section):
    """``jzlake eval`` / ``jzlake promote`` (``models/eval``). Benchmarks are names from the
    ``benchmarks:`` section (field mappings live there, shared with decontamination)."""

    model: str = "models:/jiuzhang-math@challenger"
    benchmarks: list[str] = Field(default_factory=lambda: ["gsm8k", "math500", "svamp"])
    settings: list[Literal["cot", "tool"]] = Field(default_factory=lambda: ["cot", "tool"])
    backend: str | None = None          # None: generation.backend
    max_new_tokens: int = 1024          # per generation (per round in the tool setting)
    tool_max_rounds: int = 4
    concurrency: int = 8
    limit: int | None = None            # first N items per benchmark (smoke runs)
    bootstrap_samples: int = 1000
    seed: int = 0
    grader_timeout_s: float = 5.0
    gate: GateThresholds = Field(default_factory=GateThresholds)
    synthesizer_gate: SynthesizerGateThresholds = Field(default_factory=SynthesizerGateThresholds)


class Settings(_Section):
    home: str = "."
    lake: LakeSettings = Field(default_factory=LakeSettings)
    spark: SparkSettings = Field(default_factory=SparkSettings)
    sources: dict[str, SourceSettings] = Field(default_factory=dict)
    benchmarks: dict[str, BenchmarkSettings] = Field(default_factory=dict)
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    clean: CleanSettings = Field(default_factory=CleanSettings)
    dedup: DedupSettings = Field(default_factory=DedupSettings)
    decontam: DecontamSettings = Field(default_factory=DecontamSettings)
    gpu: GpuSettings = Field(default_factory=GpuSettings)
    models: ModelSettings = Field(default_factory=ModelSettings)
    mlflow: MlflowSettings = Field(default_factory=MlflowSettings)
    influence: InfluenceSettings = Field(default_factory=InfluenceSettings)
    generation: GenerationSettings = Field(default_factory=GenerationSettings)
    prompts: PromptSettings = Field(default_factory=PromptSettings)
    sandbox: SandboxSettings = Field(default_factory=SandboxSettings)
    distil: DistilSettings = Field(default_factory=DistilSettings)
    synthesis: SynthesisSettings = Field(default_factory=SynthesisSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    eval: EvalSettings = Field(default_factory=EvalSettings)
    airflow: AirflowSettings = Field(default_factory=AirflowSettings)
    maintenance: MaintenanceSettings = Field(default_factory=MaintenanceSettings)
    quality: QualitySettings = Field(default_factory=QualitySettings)

    def path(self, value: str) -> str:
        """Resolve a configured path: URIs unchanged, relative paths against ``home``."""
        return resolve_path(value, self.home)

    @property
    def lake_root(self) -> str:
        return self.path(self.lake.root)

    @property
    def runs_dir(self) -> str:
        if self.lake.runs_dir:
            return self.path(self.lake.runs_dir)
        return f"{self.lake_root.rstrip('/')}/_runs"


def is_uri(value: str) -> bool:
    return "://" in value or value.startswith("file:")


def resolve_path(value: str, home: str) -> str:
    if is_uri(value) or os.path.isabs(value):
        return value
    return str((Path(home) / value).resolve())


def default_home(environ: Mapping[str, str]) -> str:
    if environ.get("JZLAKE_HOME"):
        return str(Path(environ["JZLAKE_HOME"]).resolve())
    checkout = PACKAGE_DIR.parent
    if (checkout / "pyproject.toml").exists():
        return str(checkout)
    return str(Path.cwd())


def deep_merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; ``update`` wins. Neither input is modified."""
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """``JZLAKE__SPARK__MASTER=x`` → ``{"spark": {"master": "x"}}`` (values parsed as YAML)."""
    overrides: dict[str, Any] = {}
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX):
            continue
        parts = [p.lower() for p in key[len(ENV_PREFIX):].split("__") if p]
        node = overrides
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(raw) if raw else raw
    if environ.get("SPARK_MASTER"):
        overrides.setdefault("spark", {}).setdefault("master", environ["SPARK_MASTER"])
    if environ.get("MLFLOW_TRACKING_URI"):
        overrides.setdefault("mlflow", {}).setdefault("tracking_uri", environ["MLFLOW_TRACKING_URI"])
    return overrides


def load_settings(
    config: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Build the settings object (see module docstring for the precedence)."""
    environ = os.environ if environ is None else environ
    data: dict[str, Any] = yaml.safe_load(DEFAULTS_FILE.read_text()) or {}
    config = config or environ.get("JZLAKE_CONFIG")
    if config:
        user = yaml.safe_load(Path(config).read_text()) or {}
        if not isinstance(user, dict):
            raise ValueError(f"config file {config} must hold a YAML mapping, got {type(user).__name__}")
        data = deep_merge(data, user)
    data = deep_merge(data, env_overrides(environ))
    data = deep_merge(data, overrides or {})
    data.setdefault("home", default_home(environ))
    if data.get("home") in (None, "."):
        data["home"] = default_home(environ)
    return Settings.model_validate(data)
