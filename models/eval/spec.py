"""Benchmark specs: everything that decides a score, frozen and hashed.

A spec is one benchmark in one setting: the benchmark file's sha256, the prompt template,
decoding (greedy, max new tokens, stop strings), the tool loop's rounds, the extraction rule
and the grader version (math-verify's version + ``answers.GRADER_RULES_VERSION``). Its
``spec_hash`` travels with every result (``gold.eval_predictions``, MLflow tags); the gate
compares only results with the current spec hash, so a changed prompt, file or grader makes
older numbers stale instead of silently comparable.

Settings, as JiuZhang3.0 evaluates:

* ``cot``: zero-shot ``## Question\\n{q}\\n\\n## Solution\\n``, greedy, 1,024 new tokens, stop at the
  next ``## Question``; the answer is the last ``\\boxed{}`` (else "the answer is", else the last
  number).
* ``tool``: ``## Question\\n{q}\\n\\n## Code Solution\\n``; each round stops before a model-written
  ```` ```output```` block; the last program runs in the sandbox and its output block is
  appended; at most 4 rounds; stop at a ``\\boxed{}`` answer (else the last program's printed
  answer).

Benchmarks come from the ``benchmarks:`` settings (field mappings shared with decontamination);
``NAME=PATH`` on the command line loads any JSON/JSONL with ``question``|``problem`` + ``answer``
with no config (the same loader, ``jzlake.benchmarks``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from jzlake.benchmarks import BenchmarkItem, file_sha256, load_benchmark
from jzlake.lineage import stable_hash
from jzlake.settings import BenchmarkSettings
from models.generation.answers import grader_version

if TYPE_CHECKING:
    from jzlake.settings import Settings

Setting = Literal["cot", "tool"]
SETTINGS: tuple[Setting, ...] = ("cot", "tool")

COT_TEMPLATE = "## Question\n{question}\n\n## Solution\n"
TOOL_TEMPLATE = "## Question\n{question}\n\n## Code Solution\n"
COT_STOP = ("## Question",)
TOOL_STOP = ("## Question", "```output")  # the sandbox writes the output block, not the model
OUTPUT_BLOCK = "```output\n{output}\n```\n"
EXTRACTION_RULES = {"cot": "last_boxed|answer_is|last_number", "tool": "last_boxed|printed_answer"}


@dataclass(frozen=True)
class BenchmarkSpec:
    """One benchmark × setting, as scored. ``spec_hash`` covers every field."""

    benchmark: str
    setting: Setting
    file_sha256: str
    prompt_template: str
    decoding: dict[str, Any] = field(hash=False)
    max_rounds: int
    extraction_rule: str
    grader_version: str
    field_mapping: dict[str, Any] = field(hash=False)

    @property
    def spec_hash(self) -> str:
        return stable_hash(asdict(self), length=16)

    @property
    def key(self) -> str:
        """``benchmark/setting`` (metric names, gate thresholds)."""
        return f"{self.benchmark}/{self.setting}"


def make_spec(benchmark: str, setting: Setting, file_hash: str, config: BenchmarkSettings,
              max_new_tokens: int = 1024, max_rounds: int = 4) -> BenchmarkSpec:
    """The spec of ``benchmark`` in ``setting`` (greedy decoding, the paper's prompts)."""
    if setting not in SETTINGS:
        raise ValueError(f"unknown setting {setting!r}; choose cot or tool")
    decoding = {"temperature": 0.0, "top_p": 1.0, "max_new_tokens": max_new_tokens,
                "stop": list(COT_STOP if setting == "cot" else TOOL_STOP)}
    mapping = config.model_dump(exclude={"path"})
    return BenchmarkSpec(benchmark, setting, file_hash, COT_TEMPLATE if setting == "cot" else TOOL_TEMPLATE,
                         decoding, max_rounds if setting == "tool" else 1, EXTRACTION_RULES[setting],
                         grader_version(), mapping)


@dataclass(frozen=True)
class LoadedBenchmark:
    name: str
    path: str
    file_sha256: str
    config: BenchmarkSettings
    items: list[BenchmarkItem]
    items_total: int  # in the file; fewer items (--limit) make a partial result


def benchmark_configs(settings: Settings, overrides: dict[str, str] | None = None,
                      names: list[str] | None = None) -> dict[str, tuple[BenchmarkSettings, str]]:
    """``name → (config, resolved path)``: ``overrides`` (``NAME=PATH``) win; a configured name keeps
    its field mapping with the new path, an unknown name gets the no-config defaults."""
    chosen: dict[str, tuple[BenchmarkSettings, str]] = {}
    if overrides:
        for name, path in overrides.items():
            base = settings.benchmarks.get(name)
            config = base.model_copy(update={"path": path}) if base else BenchmarkSettings(path=path)
            chosen[name] = (config, path)
        return chosen
    for name in names if names is not None else settings.eval.benchmarks:
        if name not in settings.benchmarks:
            raise KeyError(f"eval.benchmarks names {name!r}, which is not in the `benchmarks:` settings "
                           f"(known: {sorted(settings.benchmarks)}); add it there or pass --benchmark {name}=PATH")
        config = settings.benchmarks[name]
        chosen[name] = (config, settings.path(config.path))
    return chosen


def load(name: str, config: BenchmarkSettings, path: str, limit: int | None = None) -> LoadedBenchmark:
    """Items of one benchmark (the first ``limit`` when set) and its file hash."""
    if not Path(path).exists():
        raise FileNotFoundError(f"benchmark {name!r}: {path} does not exist (the data folder provides it: "
                                "data/sample/benchmarks or ../shared/data); fix --benchmark or `benchmarks:`")
    items = load_benchmark(name, config, path)
    return LoadedBenchmark(name, path, file_sha256(path), config, items[:limit] if limit else items, len(items))
