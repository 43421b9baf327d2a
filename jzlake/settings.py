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
    ``Question`` too); ``id_field`` unset means the row index.
    """

    path: str
    text_fields: list[str] | None = None
    id_field: str | None = None
    answer_field: str | None = None


class LakeSettings(_Section):
    root: str = "var/lake"
    runs_dir: str = "var/runs"


class SparkSettings(_Section):
    master: str = "local[*]"
    app_name: str = "jiuzhang-lake"
    jars_dir: str = "var/jars"
    shuffle_partitions: int = 8
    driver_memory: str = "3g"
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
    max_dup_5gram_fraction: float = 0.15
    min_math_density: float | None = None


class DedupSettings(_Section):
    shingle_words: int = 5
    num_perm: int = 128
    bands: int = 16
    rows_per_band: int = 8
    jaccard_threshold: float = 0.8
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
    ngram: int = 13
    short_ngram: int = 8
    min_containment: float = 0.25
    min_item_tokens: int = 6


class GpuSettings(_Section):
    backend: Literal["local", "kubernetes"] = "local"
    image: str = "jiuzhang-lake/gpu:latest"
    namespace: str = "jiuzhang"
    markers_dir: str = "var/markers"


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

    def path(self, value: str) -> str:
        """Resolve a configured path: URIs unchanged, relative paths against ``home``."""
        return resolve_path(value, self.home)

    @property
    def lake_root(self) -> str:
        return self.path(self.lake.root)

    @property
    def runs_dir(self) -> str:
        return self.path(self.lake.runs_dir)


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
