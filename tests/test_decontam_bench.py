"""`make bench-decontam` at smoke size, on the repo's data/sample: the labelled set is built, the
job's detection runs on it next to the old rule, and the recall / false-positive targets hold."""

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
def test_smoke_benchmark_meets_recall_and_false_positive_targets() -> None:
    # Its own process: the benchmark builds (and stops) a Spark session of its own.
    args = [sys.executable, "-m", "benchmarks.bench_decontam", "--sample", "--items", "12", "--gate"]
    env = {**os.environ, "JZLAKE_HOME": str(REPO)}
    env.pop("SPARK_MASTER", None)
    done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["data"] == "sample" and result["positives"] == 2 * 4 * 12
    kinds = result["by_kind"]
    assert {k for k in kinds if "/" not in k} == {"verbatim", "edited", "numbers_changed", "spacing", "stock_phrase",
                                                  "first_sentence", "background", "negatives"}
    assert kinds["edited/short"]["of"] > 0 and kinds["edited/long"]["of"] > 0  # both item sizes are drawn
    for key in ("recall_verbatim", "recall_edited", "recall_numbers_changed", "recall_spacing"):
        assert result[key] >= 0.98, (key, result["missed"])
    assert result["false_positive_rate"] <= 0.001, result["false_positives"]
    assert kinds["negatives"]["of"] >= 700  # every sample document is a background negative
    assert result["docs_per_s"] > 0 and result["baseline_docs_per_s"] > 0 and result["throughput_ratio"] > 0
    # the gate passes on recall and false positives; throughput is judged at full size only
    targets = result["targets_met"]
    assert targets["recall"] and targets["false_positive_rate"]
    assert done.returncode == (0 if all(targets.values()) else 1), done.stderr[-2000:]
