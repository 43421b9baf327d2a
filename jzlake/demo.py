"""``make demo``: the whole pipeline, as far as it exists, on the embedded default.

Each step runs the real CLI (``jzlake <stage>``) in a subprocess, exactly as a user would, and
reads the JSON summary it prints last. The console gets one line per finished step (seconds and
the numbers that matter); each step's full summary and its stderr (Spark, HTTP, progress bars)
go to ``var/demo/`` and are named in the closing summary, with the tables (rows, Delta version)
and the registered models with their aliases.

Chain: curate → influence → distil (initialize + boost rounds) → train the synthesizer
(registered ``@challenger``) → synthesize with it (``models:/`` resolution) → filter → gate the
synthesizer → train JiuZhang (registered ``@challenger``). A second run reuses everything:
content-addressed runs, ledgered calls and training keys make every step a no-op.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from jzlake.settings import Settings, load_settings

# A gate's refusal is a decision, not a crash (``models.eval.promote`` exits 3 after its summary).
GATE_REFUSED_EXIT = 3


@dataclass(frozen=True)
class Step:
    name: str
    argv: tuple[str, ...]
    explain: str
    allowed_exits: tuple[int, ...] = (0,)


CURATION = [
    Step("curate", ("curate",), "ingest → clean → dedupe → decontaminate → report (Spark → Delta)"),
    # Demo-sized on CPU (the job's defaults are LESS's: 512 tokens, d = 8192, 4 epochs).
    Step("influence", ("influence", "--top-k", "12", "--max-seq-len", "128", "--projection-dim", "1024",
                       "--warmup-epochs", "2"), "LESS gradient influence → gold.selected_texts"),
]
DISTILLATION = [
    Step("distil-initialize", ("distil", "--round", "initialize", "--max-documents", "6", "--max-new-tokens", "96"),
         "KD round 1: seeded sample of gold.corpus → teacher → gold.kd_dataset"),
    Step("distil-boost", ("distil", "--round", "boost", "--max-documents", "6", "--max-new-tokens", "96"),
         "KD round 2: the influence pick → teacher → gold.kd_dataset"),
]
TRAIN_SYNTHESIZER = Step("train-synthesizer", ("train", "synthesizer"),
                         "fine-tune the synthesizer on gold.kd_dataset (+ format seed) → jiuzhang-synthesizer")
# The tiny synthesizer parses about a third of its replies: enough documents for ≥ 20 kept problems.
SYNTHESIS = [
    Step("synthesize", ("synthesize", "--max-documents-per-shard", "120", "--max-new-tokens", "256"),
         "jiuzhang-synthesizer (registry) over gold.corpus → gold.synthetic_raw"),
    Step("filter-synthetic", ("filter-synthetic",), "filter, dedupe, decontaminate → gold.synthetic_problems"),
    Step("promote-synthesizer", ("promote", "jiuzhang-synthesizer", "--kind", "synthesizer"),
         "gate: validity and contamination of its samples → @champion or refused",
         allowed_exits=(0, GATE_REFUSED_EXIT)),
]
TRAIN_JIUZHANG = Step("train-jiuzhang", ("train", "jiuzhang"),
                      "continued pre-training on synthetic problems, then SFT (WSD, packing) → jiuzhang-math")
REGISTERED = ("jiuzhang-synthesizer", "jiuzhang-math")

# Summary keys worth a place on the step's one console line, in this order.
HEADLINE_KEYS = ("rows_written", "kept", "dropped", "selected", "accepted", "rejected", "calls", "teacher",
                 "model", "version", "alias", "new_version", "decision", "passed", "tokens_trained", "loss_last")


class StepFailed(SystemExit):
    pass


def demo_dir(settings: Settings) -> Path:
    path = Path(settings.path("var/demo"))
    (path / "logs").mkdir(parents=True, exist_ok=True)
    return path


def run_step(step: Step, env: dict[str, str], out_dir: Path) -> tuple[dict[str, Any], float, int]:
    """Run ``jzlake <argv>`` with stderr to its log file; return its JSON summary, seconds, exit."""
    log_path = out_dir / "logs" / f"{step.name}.log"
    started = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.run([sys.executable, "-m", "jzlake.cli", *step.argv], env=env,
                              stdout=subprocess.PIPE, stderr=log, text=True, check=False)
    elapsed = time.monotonic() - started
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode not in step.allowed_exits or not lines:
        tail = log_path.read_text(errors="replace").splitlines()[-25:]
        raise StepFailed("\n".join([f"demo step {step.name!r} failed (exit {proc.returncode}); last lines of "
                                    f"{log_path}:", *tail]))
    summary = json.loads(lines[-1])
    (out_dir / f"{step.name}.json").write_text(json.dumps(summary, indent=2, sort_keys=True, default=str))
    return summary, elapsed, proc.returncode


def headline(summary: dict[str, Any]) -> str:
    """The few numbers of a summary a person wants on the step's line."""
    parts = []
    for key in HEADLINE_KEYS:
        value = summary.get(key)
        if value is None or isinstance(value, dict | list):
            continue
        parts.append(f"{key}={value:.3g}" if isinstance(value, float) else f"{key}={value}")
    return " ".join(parts)


def step_line(step: Step, summary: dict[str, Any], elapsed: float, exit_code: int) -> str:
    state = "refused" if exit_code == GATE_REFUSED_EXIT else "ok"
    reasons = summary.get("reasons") or []
    why = f"  why: {reasons[0]}" + (f" (+{len(reasons) - 1} more)" if len(reasons) > 1 else "") if reasons else ""
    return f"{state:>7} {step.name:<20} {elapsed:6.0f} s  {headline(summary)}{why}"


def format_tables(tables: dict[str, dict[str, Any]]) -> str:
    lines = ["", f"{'table':32} {'version':>7} {'rows':>9}"]
    for name, info in sorted(tables.items()):
        if info["version"] is not None:
            lines.append(f"{name:32} {info['version']:>7} {info['rows']:>9}")
    return "\n".join(lines)


def registered_models(settings: Settings, names: Sequence[str] = REGISTERED) -> list[str]:
    """One line per registered version: name, version, aliases, gate decision."""
    from models.registry import client

    lines = []
    for name in names:
        try:
            versions = client(settings).search_model_versions(f"name = '{name}'")
        except Exception:  # not registered yet
            versions = []
        for version in sorted(versions, key=lambda v: int(v.version)):
            full = client(settings).get_model_version(name, version.version)
            aliases = ",".join(sorted(full.aliases or [])) or "-"
            decision = (full.tags or {}).get("jzlake.gate.decision", "not gated")
            lines.append(f"{name:22} v{version.version:<4} aliases={aliases:<22} gate={decision}")
    return lines or ["(none)"]


@contextlib.contextmanager
def serving(model_dir: str | Path, port: int, log_path: Path) -> Iterator[None]:
    from models.generation.local_server import start_server

    with start_server(model_dir, port, log_path=log_path):
        yield


def run_steps(steps: Sequence[Step], env: dict[str, str], out_dir: Path, results: dict[str, Any]) -> None:
    for step in steps:
        summary, elapsed, exit_code = run_step(step, env, out_dir)
        results[step.name] = summary
        print(step_line(step, summary, elapsed, exit_code), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    from models.synthesize import resolve_synthesizer
    from models.tiny import ensure_tiny_model

    settings = load_settings()
    out_dir = demo_dir(settings)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per download otherwise
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    started = time.monotonic()
    results: dict[str, Any] = {}
    print(f"JiuZhang Lake demo — lake at {settings.lake_root}, Spark master {settings.spark.master}; "
          f"step logs in {out_dir}", flush=True)
    port = urlparse(settings.generation.base_url).port or 18300
    try:
        run_steps(CURATION, env, out_dir, results)
        key_env = settings.generation.api_key_env or "OPENAI_API_KEY"
        if not os.environ.get(key_env):
            print(f"        No {key_env} set: the teacher is the tiny local model behind `transformers serve "
                  "--continuous-batching` (plumbing only: its replies rarely parse, so the synthesizer also "
                  "learns from the GSM8K format seed).", flush=True)
        with serving(ensure_tiny_model(settings), port, out_dir / "logs" / "teacher-server.log"):
            run_steps(DISTILLATION, env, out_dir, results)
        run_steps([TRAIN_SYNTHESIZER], env, out_dir, results)
        # The registry's pick, as `jzlake synthesize` makes it (its log lines go to the step's log).
        with open(out_dir / "logs" / "resolve-synthesizer.log", "w") as log, contextlib.redirect_stderr(log):
            synthesizer = resolve_synthesizer(settings)
        with serving(synthesizer.served_models[synthesizer.model], port, out_dir / "logs" / "synthesizer-server.log"):
            run_steps(SYNTHESIS[:1], env, out_dir, results)
        run_steps(SYNTHESIS[1:], env, out_dir, results)
        run_steps([TRAIN_JIUZHANG], env, out_dir, results)
    except StepFailed as failure:
        print(str(failure), file=sys.stderr)
        return 1
    tables, _, _ = run_step(Step("tables", ("tables", "--json"), "catalogued tables"), env, out_dir)
    print(format_tables(tables["tables"]))
    print("\nRegistered models (MLflow):")
    print("\n".join("  " + line for line in registered_models(settings)))
    print(f"\nDone in {time.monotonic() - started:.0f} s. Step summaries and logs: {out_dir} · curation reports: "
          f"{settings.runs_dir}/<run id>/report.html · MLflow: {settings.mlflow.tracking_uri} "
          f"(UI: .venv/bin/mlflow ui --backend-store-uri {settings.mlflow.tracking_uri})\n"
          "Rerun `make demo`: unchanged input adds nothing, no call is repeated, no model version is added.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
