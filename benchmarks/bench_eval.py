"""Evaluation benchmark: generation concurrency through the local server, and grader throughput.

Measured in one run:

* ``items_per_s_c1`` / ``items_per_s_c8``: CoT evaluation items/s (generate + extract + grade,
  ``models.eval.runner.run_cot``) through one local ``transformers serve --continuous-batching``
  over the tiny model (CPU), ``openai`` backend at concurrency 1 and 8, the same number of GSM8K
  test items of the same shape and ``max_new_tokens``; ``concurrency_speedup`` is their ratio;
* ``grader_answers_per_s``: ``answers.grade`` on GSM8K test reference solutions (the ``####``
  answer of each worked solution vs the reference: plain numbers, the fast path), one core;
  ``grader_math500_answers_per_s``: MATH500's worked-solution ``\\boxed{}`` vs its answer field
  (LaTeX; most agree as strings after normalisation); ``grader_math_verify_answers_per_s``: the
  same MATH500 pairs sent straight to the math-verify helper process (the slow path every
  non-trivial pair takes);
* the 1-minute load average (the machine is shared).

Target: ``grader_answers_per_s`` ≥ 1,000 (``grader_target_met``). Last line: one JSON object.

    python -m benchmarks.bench_eval [--items 16] [--max-tokens 32] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
GSM8K = REPO / "data" / "sample" / "benchmarks" / "gsm8k" / "test.jsonl"
MATH500 = REPO / "data" / "sample" / "benchmarks" / "math500" / "test.jsonl"
PORTS = range(18301, 18305)


def _benchmarks() -> dict[str, Any]:
    from jzlake.settings import BenchmarkSettings
    from models.eval.spec import load

    return {"gsm8k": load("gsm8k", BenchmarkSettings(path=str(GSM8K), answer_field="answer"), str(GSM8K)),
            "math500": load("math500", BenchmarkSettings(path=str(MATH500), id_field="unique_id",
                                                          answer_field="answer"), str(MATH500))}


def grader_throughput(benchmarks: dict[str, Any]) -> dict[str, Any]:
    from models.eval.job import worked_answer
    from models.generation.answers import _worker, grade

    out: dict[str, Any] = {}
    for name in ("gsm8k", "math500"):
        pairs = [(worked_answer(i.metadata), i.answer) for i in benchmarks[name].items]
        pairs = [(p, r) for p, r in pairs if p is not None]
        grade(*pairs[0])  # warm caches (and, for LaTeX pairs, the helper process)
        started = time.perf_counter()
        agree = sum(grade(p, r).equal for p, r in pairs)
        seconds = time.perf_counter() - started
        key = "grader_answers_per_s" if name == "gsm8k" else "grader_math500_answers_per_s"
        out[key] = round(len(pairs) / seconds, 1)
        out[f"grader_{name}_pairs"] = len(pairs)
        out[f"grader_{name}_agreement"] = round(agree / len(pairs), 4)
    pairs = [(worked_answer(i.metadata), i.answer) for i in benchmarks["math500"].items]
    worker = _worker()
    started = time.perf_counter()
    verified = [worker.verify(p or "", r or "", 5.0).equal for p, r in pairs]
    out["grader_math_verify_answers_per_s"] = round(len(pairs) / (time.perf_counter() - started), 1)
    out["grader_math_verify_agreement"] = round(sum(verified) / len(verified), 4)
    return out


def concurrency(benchmarks: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    from jzlake.settings import BenchmarkSettings, load_settings
    from models.eval.runner import run_cot
    from models.eval.spec import make_spec
    from models.generation.backends.openai_backend import OpenAIBackend
    from models.generation.local_server import is_ready, start_server
    from models.tiny import ensure_tiny_model

    model_dir = ensure_tiny_model(load_settings(environ={}))
    port = next(p for p in PORTS if not is_ready(f"http://127.0.0.1:{p}"))
    items = benchmarks["gsm8k"].items
    spec = make_spec("gsm8k", "cot", benchmarks["gsm8k"].file_sha256, BenchmarkSettings(path=str(GSM8K)),
                     max_new_tokens=args.max_tokens)
    out: dict[str, Any] = {"items": args.items, "max_new_tokens": args.max_tokens}
    log_path = REPO / "var" / "llm" / f"bench-eval-{port}.log"
    with start_server(model_dir, port, threads=args.threads, log_path=log_path) as server:
        served = {"tiny": server.served_model}
        warm = OpenAIBackend(server.base_url, concurrency=1, served_models=served)
        run_cot(items[-2:], spec, warm, "tiny")  # first requests allocate the KV cache
        for level, offset in ((1, 0), (8, args.items)):
            backend = OpenAIBackend(server.base_url, concurrency=level, served_models=served)
            started = time.perf_counter()
            results = run_cot(items[offset:offset + args.items], spec, backend, "tiny")
            seconds = time.perf_counter() - started
            out[f"items_per_s_c{level}"] = round(len(results) / seconds, 3)
            out[f"generation_errors_c{level}"] = sum(1 for r in results if r.error)
    out["concurrency_speedup"] = round(out["items_per_s_c8"] / out["items_per_s_c1"], 3)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=16, help="GSM8K items per concurrency level")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="server CPU threads")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    benchmarks = _benchmarks()
    grader = grader_throughput(benchmarks)
    print(f"grader: {grader['grader_answers_per_s']:.0f} numeric answers/s, "
          f"{grader['grader_math_verify_answers_per_s']:.0f} math-verify answers/s", file=sys.stderr)
    generation = concurrency(benchmarks, args)
    print(f"eval items/s: c1 {generation['items_per_s_c1']}, c8 {generation['items_per_s_c8']}", file=sys.stderr)
    summary = {**generation, **grader, "grader_target_answers_per_s": 1000,
               "grader_target_met": grader["grader_answers_per_s"] >= 1000,
               "load_avg_1m": round(os.getloadavg()[0], 2), "cpus": os.cpu_count(),
               "elapsed_s": round(time.perf_counter() - started, 2)}
    print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
