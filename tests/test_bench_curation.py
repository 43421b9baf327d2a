"""`make bench-curation` end to end on a small corpus: every stage timed, quality measured, gate enforced."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.spark
def test_small_benchmark_times_every_stage_and_gates_on_f1(tmp_path: Path) -> None:
    # Its own process: the benchmark builds (and stops) a Spark session of its own.
    # One run with an unreachable --min-f1: the JSON is still printed, and the gate fails the run.
    args = [sys.executable, "-m", "benchmarks.bench_curation", "--docs", "2500", "--clean-docs", "400",
            "--planted", "20", "--out", str(tmp_path), "--min-f1", "1.01"]
    env = {**os.environ, "JZLAKE_HOME": str(REPO)}
    env.pop("SPARK_MASTER", None)
    done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 1 and "below --min-f1 1.01" in done.stderr, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(result["docs_per_s"]) == {"ingest", "clean", "dedupe", "decontaminate", "dedupe_incremental"}
    assert all(v > 0 for v in result["docs_per_s"].values())
    assert result["ingest_clean_summary"]["ingest"]["ingested"] == 400
    assert result["ground_truth"]["true_pairs"] > 0 and result["near_dup_f1"] >= 0.95
    assert result["meets_f1"] is False  # only against the unreachable bar
    assert result["decontam_planted"]["flagged"] > 0
