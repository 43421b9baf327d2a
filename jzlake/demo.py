"""``make demo``: the whole pipeline, as far as it exists, on the embedded default.

Each step runs the real CLI (``jzlake <stage>``) in a subprocess, exactly as a user would, and
reads the JSON summary it prints last. Output: a readable summary of what ran, the tables with
their Delta versions and row counts, and where the reports are.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from jzlake.settings import load_settings


@dataclass(frozen=True)
class Step:
    name: str
    argv: tuple[str, ...]
    explain: str


def curation_steps() -> list[Step]:
    return [
        Step("curate", ("curate",), "ingest → clean → dedupe → decontaminate → report (Spark → Delta)"),
        # Demo-sized on CPU (the job's defaults are LESS's: 512 tokens, d = 8192, 4 epochs).
        Step("influence", ("influence", "--top-k", "12", "--max-seq-len", "128", "--projection-dim", "1024",
                           "--warmup-epochs", "2"),
             "LESS gradient influence on the tiny local model → gold.influence_scores, gold.selected_texts"),
    ]


def generation_steps() -> list[Step]:
    """Steps that talk to an OpenAI-compatible server (the local one unless a key is configured)."""
    return [
        Step("distil", ("distil", "--max-documents", "6", "--max-new-tokens", "96"),
             "education-stage prompts over the selected texts → ledgered teacher calls → gold.kd_dataset"),
        # Until the training stage registers jiuzhang-synthesizer@champion, the tiny model stands in.
        Step("synthesize", ("synthesize", "--model", "var/models/tiny-llama", "--max-documents-per-shard", "6",
                            "--max-new-tokens", "96"),
             "synthesizer (the tiny model stands in) over gold.corpus, sharded and resumable → gold.synthetic_raw"),
        Step("filter-synthetic", ("filter-synthetic",),
             "filter, dedupe, decontaminate synthetic problems (Spark) → gold.synthetic_problems"),
    ]


def run_step(step: Step, env: dict[str, str]) -> tuple[dict[str, Any], float]:
    """Run ``jzlake <argv>``; stream its stderr; return its JSON summary and wall time."""
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "jzlake.cli", *step.argv], env=env,
                          stdout=subprocess.PIPE, text=True, check=False)
    elapsed = time.monotonic() - started
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"demo step {step.name!r} failed (exit {proc.returncode}); its output is above")
    return json.loads(lines[-1]), elapsed


def format_summary(step: Step, summary: dict[str, Any], elapsed: float) -> str:
    shown = {k: v for k, v in summary.items() if k != "tables"}
    return f"\n== {step.name} ({elapsed:.0f} s): {step.explain}\n" + json.dumps(shown, indent=2, sort_keys=True)


def format_tables(tables: dict[str, dict[str, Any]]) -> str:
    lines = ["", f"{'table':32} {'version':>7} {'rows':>9}"]
    for name, info in sorted(tables.items()):
        if info["version"] is not None:
            lines.append(f"{name:32} {info['version']:>7} {info['rows']:>9}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from models.generation.local_server import start_server
    from models.tiny import ensure_tiny_model

    settings = load_settings()
    env = dict(os.environ)
    print(f"JiuZhang Lake demo — lake at {settings.lake_root}, Spark master {settings.spark.master}")
    for step in curation_steps():
        summary, elapsed = run_step(step, env)
        print(format_summary(step, summary, elapsed), flush=True)
    key_env = settings.generation.api_key_env or "OPENAI_API_KEY"
    if not os.environ.get(key_env):
        print(f"\nNo {key_env} set: the teacher is the tiny local model behind "
              "`transformers serve --continuous-batching` (plumbing only: its problems are not real math).")
    port = urlparse(settings.generation.base_url).port or 18300
    with start_server(ensure_tiny_model(settings), port, log_path=settings.path("var/llm/demo-server.log")):
        for step in generation_steps():
            summary, elapsed = run_step(step, env)
            print(format_summary(step, summary, elapsed), flush=True)
    tables, _ = run_step(Step("tables", ("tables", "--json"), "catalogued tables"), env)
    print(format_tables(tables["tables"]))
    print(f"\nCuration reports: {settings.runs_dir}/<run id>/report.html · MLflow runs: "
          f"{settings.mlflow.tracking_uri}\nRerun `make demo`: unchanged input adds nothing and no call is repeated.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
