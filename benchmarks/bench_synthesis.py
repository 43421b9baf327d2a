"""Synthesis benchmark: server concurrency, ledger overhead and parse/validate throughput.

One local ``transformers serve --continuous-batching`` over the tiny model (CPU), prompts built
from real sample text (GSM8K train questions as excerpts). Measured in the same run:

* requests/s through the ``openai`` backend at concurrency 1 and 8 (distinct prompts of the
  same shape, same ``max_tokens``), and their ratio ``concurrency_speedup``;
* the engine + ledger overhead per request: the full ``run_generation`` path (dedupe, ledger
  read, pending rows, budget reserve/settle, Delta MERGEs) around an in-process backend that
  answers instantly, so only our bookkeeping is timed. ``ledger_overhead_ms``: the buffered
  ledger (free local models, mass synthesis); ``ledger_write_through_overhead_ms``: the
  write-through ledger of paid teachers (a durable ``sending`` row before each send, each answer
  committed before the slot sends again), measured twice — a serial backend (the worst case: two
  commits per request, nothing overlaps) and a backend with 8 requests in flight, where the
  markers of requests dispatched together share a commit (``..._concurrent_ms``; on a real
  server the commits overlap the requests still in flight). ``*_write_ms`` is the Delta part;
* ``parse_per_s``: ``models.generation.parsing.parse_reply`` (sections, boxed answer, excerpt
  n-gram containment) on well-formed CoT replies built from GSM8K solutions, plus the tiny
  model's own replies from the concurrency runs (reported separately: they are mostly rejects).

The machine is shared, so the 1-minute load average is reported with the numbers. Last line:
one JSON object.

    python -m benchmarks.bench_synthesis [--requests 24] [--max-tokens 32] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = REPO / "data" / "sample" / "benchmarks" / "gsm8k" / "train.head600.jsonl"
PORTS = range(18305, 18310)


def gsm8k_rows() -> list[dict[str, str]]:
    return [json.loads(line) for line in QUESTIONS.read_text(encoding="utf-8").splitlines() if line.strip()]


def build_requests(rows: Sequence[dict[str, str]], model: str, max_tokens: int, tag: str) -> list[Any]:
    from models.generation.types import GenerationRequest, SamplingParams

    return [GenerationRequest(
        model=model,
        messages=(("system", "You write new grade-school math problems."),
                  ("user", f"Excerpt:\n{row['question']}\n\nWrite a new problem inspired by the excerpt, then "
                           "solve it step by step and end with \\boxed{answer}.")),
        sampling=SamplingParams(temperature=1.0, max_tokens=max_tokens, seed=i),
        template_id=f"bench-{tag}", template_hash="b0", lineage={"doc_id": f"gsm8k-train-{i}"})
        for i, row in enumerate(rows)]


def well_formed_reply(row: dict[str, str]) -> str:
    """A CoT reply in the templates' output format, from a real GSM8K problem and its solution."""
    solution, _, final = row["answer"].partition("####")
    solution = re.sub(r"<<[^>]*>>", "", solution).strip()
    return f"## Problem\n{row['question']}\n\n## Solution\n{solution}\nSo the answer is \\boxed{{{final.strip()}}}."


class InstantBackend:
    """Answers every request at once: isolates the engine + ledger cost."""

    name = "instant"

    def generate(self, requests: Iterable[Any]) -> Iterator[Any]:
        from models.generation.types import GenerationResponse

        for request in requests:
            yield GenerationResponse(request.key, "## Problem\nx\n\n## Solution\n\\boxed{1}", "stop", 200, 50,
                                     0.0, "instant")


class ConcurrentInstantBackend:
    """Answers at once, but like ``openai``: pulls from its own thread with ``concurrency`` slots."""

    name = "instant-concurrent"
    pulls_concurrently = True

    def __init__(self, concurrency: int = 8) -> None:
        self.concurrency = concurrency

    def generate(self, requests: Iterable[Any], before_retry: Any = None) -> Iterator[Any]:
        import queue
        import threading

        from models.generation.types import GenerationResponse

        out: queue.Queue = queue.Queue()
        slots = threading.Semaphore(self.concurrency)
        done = object()

        def pull() -> None:
            try:
                for request in requests:
                    slots.acquire()
                    out.put(GenerationResponse(request.key, "## Problem\nx\n\n## Solution\n\\boxed{1}", "stop",
                                               200, 50, 0.0, "instant"))
            finally:
                out.put(done)

        thread = threading.Thread(target=pull, daemon=True)
        thread.start()
        while (item := out.get()) is not done:
            yield item
            slots.release()  # the slot is free once its answer was handed over
        thread.join()


def throughput(backend: Any, requests: list[Any]) -> tuple[float, list[Any]]:
    started = time.perf_counter()
    responses = list(backend.generate(requests))
    elapsed = time.perf_counter() - started
    failed = [r for r in responses if not r.ok]
    if failed:
        raise RuntimeError(f"{len(failed)} requests failed during the benchmark, e.g. {failed[0].error}")
    return len(requests) / elapsed, responses


def measure_concurrency(args: argparse.Namespace, rows: list[dict[str, str]]) -> dict[str, Any]:
    from jzlake.settings import load_settings
    from models.generation.backends.openai_backend import OpenAIBackend
    from models.generation.local_server import is_ready, start_server
    from models.tiny import ensure_tiny_model

    model_dir = ensure_tiny_model(load_settings())
    port = next(p for p in PORTS if not is_ready(f"http://127.0.0.1:{p}"))
    n = args.requests
    warm = build_requests(rows[:4], "tiny-llama", args.max_tokens, "warm")
    serial = build_requests(rows[4:4 + n], "tiny-llama", args.max_tokens, "c1")
    parallel = build_requests(rows[4 + n:4 + 2 * n], "tiny-llama", args.max_tokens, "c8")
    with start_server(model_dir, port, threads=args.threads,
                      log_path=Path(tempfile.gettempdir()) / f"bench-synthesis-{port}.log") as server:
        served = {"tiny-llama": server.served_model}
        throughput(OpenAIBackend(server.base_url, concurrency=4, served_models=served), warm)
        rps1, out1 = throughput(OpenAIBackend(server.base_url, concurrency=1, served_models=served), serial)
        rps8, out8 = throughput(OpenAIBackend(server.base_url, concurrency=8, served_models=served), parallel)
    tokens = sum(r.completion_tokens for r in out1 + out8)
    return {"requests_per_phase": n, "max_tokens": args.max_tokens, "server_threads": args.threads,
            "rps_concurrency_1": round(rps1, 3), "rps_concurrency_8": round(rps8, 3),
            "concurrency_speedup": round(rps8 / rps1, 3), "completion_tokens": tokens,
            "replies": [(r.text, r.finish_reason) for r in out1 + out8]}


def _ledger_run(requests: list[Any], backend: Any, write_through: bool) -> tuple[float, Any, float]:
    """(seconds, report, seconds of the resume pass that skips everything) for one ledger mode."""
    from models.generation.budget import Budget
    from models.generation.engine import run_generation
    from models.generation.ledger import Ledger

    with tempfile.TemporaryDirectory() as tmp:
        ledger = Ledger(f"{tmp}/kd_requests", flush_every=32, flush_seconds=5.0, write_through=write_through)
        started = time.perf_counter()
        report = run_generation(requests, backend, ledger, Budget(max_calls=10 * len(requests)))
        elapsed = time.perf_counter() - started
        assert report.succeeded == len(requests) and report.write_through is write_through, report
        rerun_started = time.perf_counter()  # the resume path: read the ledger, skip everything
        rerun = run_generation(requests, InstantBackend(), Ledger(f"{tmp}/kd_requests"), Budget())
        rerun_elapsed = time.perf_counter() - rerun_started
        assert rerun.skipped_done == len(requests) and rerun.sent == 0
    return elapsed, report, rerun_elapsed


def measure_ledger(count: int, write_through_count: int, rows: list[dict[str, str]]) -> dict[str, Any]:
    def requests(n: int, tag: str) -> list[Any]:
        return build_requests([rows[i % len(rows)] | {"question": f"{rows[i % len(rows)]['question']} #{i}"}
                               for i in range(n)], "tiny-llama", 256, tag)

    elapsed, report, rerun_elapsed = _ledger_run(requests(count, "ledger"), InstantBackend(), write_through=False)
    wt_elapsed, wt, _ = _ledger_run(requests(write_through_count, "wt"), InstantBackend(), write_through=True)
    wtc_elapsed, wtc, _ = _ledger_run(requests(write_through_count, "wtc"), ConcurrentInstantBackend(8),
                                   write_through=True)
    return {"ledger_requests": count, "ledger_overhead_ms": round(1000 * elapsed / count, 3),
            "ledger_write_ms": round(1000 * report.ledger_seconds / count, 3),
            "ledger_flushes": report.ledger_flushes,
            "resume_skip_ms": round(1000 * rerun_elapsed / count, 3),
            "ledger_write_through_requests": write_through_count,
            "ledger_write_through_overhead_ms": round(1000 * wt_elapsed / write_through_count, 3),
            "ledger_write_through_write_ms": round(1000 * wt.ledger_seconds / write_through_count, 3),
            "ledger_write_through_commits": wt.ledger_commits,
            "ledger_write_through_concurrent_ms": round(1000 * wtc_elapsed / write_through_count, 3),
            "ledger_write_through_concurrent_commits": wtc.ledger_commits}


def measure_parsing(rows: list[dict[str, str]], model_replies: list[tuple[str, str]], repeat: int) -> dict[str, Any]:
    from models.generation.parsing import parse_reply

    # Reply i answers row i while the excerpt is row i+1's question: an inspired, not copied,
    # problem (every 10th pairs a reply with its own question, so the copy check rejects some).
    samples = [(well_formed_reply(row), "stop", rows[i if i % 10 == 0 else (i + 1) % len(rows)]["question"])
               for i, row in enumerate(rows)] * repeat
    started = time.perf_counter()
    verdicts = Counter(parse_reply(text, finish, "cot", excerpt).reason or "accepted"
                       for text, finish, excerpt in samples)
    elapsed = time.perf_counter() - started
    model_verdicts = Counter(parse_reply(text, finish, "cot", "").reason or "accepted"
                             for text, finish in model_replies)
    return {"parse_samples": len(samples), "parse_per_s": round(len(samples) / elapsed, 1),
            "parse_verdicts": dict(verdicts), "tiny_model_reply_verdicts": dict(model_verdicts),
            "parser": "models.generation.parsing.parse_reply"}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_synthesis", description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=24, help="requests per concurrency phase")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the server")
    parser.add_argument("--ledger-requests", type=int, default=2000)
    parser.add_argument("--write-through-requests", type=int, default=200,
                        help="requests for the write-through measurements (two commits each)")
    parser.add_argument("--parse-repeat", type=int, default=5, help="passes over the 600 GSM8K replies")
    args = parser.parse_args(argv)
    rows = gsm8k_rows()
    if len(rows) < 4 + 2 * args.requests:
        raise SystemExit(f"{QUESTIONS} has {len(rows)} rows; need {4 + 2 * args.requests} for --requests "
                         f"{args.requests}")
    load_before = os.getloadavg()[0]
    concurrency = measure_concurrency(args, rows)
    replies = concurrency.pop("replies")
    ledger = measure_ledger(args.ledger_requests, args.write_through_requests, rows)
    parsing = measure_parsing(rows, replies, args.parse_repeat)
    result = {**concurrency, **ledger, **parsing, "load_average_1m": [round(load_before, 2),
                                                                      round(os.getloadavg()[0], 2)],
              "cpu_count": os.cpu_count(), "device": "cpu"}
    print(f"requests/s: {result['rps_concurrency_1']} at concurrency 1, {result['rps_concurrency_8']} at 8 "
          f"(x{result['concurrency_speedup']}); engine+ledger {result['ledger_overhead_ms']} ms/request "
          f"(Delta writes {result['ledger_write_ms']} ms), write-through "
          f"{result['ledger_write_through_overhead_ms']} ms serial / "
          f"{result['ledger_write_through_concurrent_ms']} ms at concurrency 8; parse {result['parse_per_s']}/s")
    print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
