"""`make bench-train` smoke test: both layouts train on the same samples and the JSON reports the ratios."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_train_reports_speedup_and_token_fraction() -> None:
    args = [sys.executable, "-m", "benchmarks.bench_train", "--samples", "24", "--max-length", "256",
            "--batch-size", "4", "--threads", "1"]
    done = subprocess.run(args, cwd=REPO, env={**os.environ, "JZLAKE_HOME": str(REPO)}, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    packed, unpacked = result["packed"], result["unpacked"]
    assert 20 <= result["samples"] <= 24 and packed["real_tokens"] == unpacked["real_tokens"] > 0, "same samples"
    assert packed["positions"] < unpacked["positions"], "packing removes padding"
    assert result["packed_token_fraction"] == packed["token_fraction"] > unpacked["token_fraction"]
    assert result["packed_token_fraction"] >= 0.9
    assert result["packed_speedup"] == pytest.approx(packed["tokens_per_s"] / unpacked["tokens_per_s"], rel=1e-2)
    assert result["attention_scores"]["packed_varlen"] < result["attention_scores"]["packed_dense"]
