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

from jzlake.settings import load_settings


@dataclass(frozen=True)
class Step:
    name: str
    argv: tuple[str, ...]
    explain: str


def demo_steps() -> list[Step]:
    return [
        Step("curate", ("curate",), "ingest → clean → dedupe → decontaminate → report (Spark → Delta)"),
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
    settings = load_settings()
    env = dict(os.environ)
    print(f"JiuZhang Lake demo — lake at {settings.lake_root}, Spark master {settings.spark.master}")
    for step in demo_steps():
        summary, elapsed = run_step(step, env)
        print(format_summary(step, summary, elapsed), flush=True)
    tables, _ = run_step(Step("tables", ("tables", "--json"), "catalogued tables"), env)
    print(format_tables(tables["tables"]))
    print(f"\nReports: {settings.runs_dir}/<run id>/report.html · rerun `make demo`: unchanged input adds nothing.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
