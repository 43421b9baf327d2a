"""Training benchmark: packed vs unpacked (padded) batches on the tiny model, same samples, same process.

Samples are real: GSM8K train pairs and MATH500 problems in the JiuZhang training format
(``## Question`` prompt, solution target; ``models/train/data.py``), tokenized with the tiny
tokenizer. Each layout trains one epoch over the same samples (forward, loss on targets,
backward, AdamW step; the training core's own loss and collation):

* ``unpacked`` — one sample per row, ``--batch-size`` rows per step padded to the longest;
* ``packed``   — samples packed into rows of ``--max-length`` tokens (position ids restart per
  sample; attention stays inside each sample), ``--packed-rows`` rows per step.

Reports real (non-pad) training tokens/s of both, ``packed_speedup`` (target ≥ 1.2) and the mean
non-pad token fraction per batch (``packed_token_fraction``, target ≥ 0.9). Last line: one JSON
object.

Why the CPU speedup is smaller than the padding saved (``positions_ratio_unpacked_over_packed``):
on CPU, sdpa applies the block-diagonal mask to a dense score matrix per row (O(row²), no block
skipping), so a packed row pays attention across its whole length; flash-attention's varlen path
on GPU computes only within-sample scores (``attention_scores.packed_varlen``). The tiny model's
hidden size (96) makes attention a large share of its compute, unlike a 7B model's.

    python -m benchmarks.bench_train [--samples 160] [--max-length 512] [--device cuda] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SOURCES = ["data/sample/benchmarks/gsm8k/train*.jsonl", "data/sample/benchmarks/math500/test.jsonl"]


def training_samples(tokenizer: Any, limit: int, max_length: int) -> list[Any]:
    """The first ``limit`` pairs of the sources as training samples (interleaved, stable order)."""
    from models.train import data

    pairs = [list(data.read_problem_pairs([pattern], str(REPO))) for pattern in SOURCES]
    interleaved = [p for group in zip(*pairs, strict=False) for p in group][:limit]
    bos = [tokenizer.bos_token_id]
    samples = []
    for _, question, solution in interleaved:
        prompt = bos + data.text_ids(tokenizer, data.SFT_PROMPT.format(question=question))
        if len(prompt) + 2 < max_length:
            samples.append(data.make_sample(prompt, data.text_ids(tokenizer, solution), tokenizer.eos_token_id,
                                            max_length)[0])
    return samples


def run_epoch(model: Any, batches: Sequence[Sequence[Any]], pad_id: int, packed: bool, device: str) -> dict[str, float]:
    """One pass (forward + backward + AdamW) over ``batches``; tokens/s and pad fractions."""
    import torch

    from models.train.data import collate
    from models.train.loop import _micro_loss

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    real = total = dense_scores = 0
    fractions = []

    def step(rows: Sequence[Any]) -> tuple[int, int]:
        batch = {k: v.to(device) for k, v in collate(rows, pad_id, packed).items()}
        loss = _micro_loss(model, batch, explicit_mask=False)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return sum(len(r) for r in rows), batch["input_ids"].numel()

    step(batches[0])  # warm-up (allocations, kernels), not timed
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    started = time.perf_counter()
    for rows in batches:
        n_real, n_total = step(rows)
        real, total = real + n_real, total + n_total
        dense_scores += len(rows) * max(len(r) for r in rows) ** 2  # what sdpa computes on CPU
        fractions.append(n_real / n_total)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return {"tokens_per_s": round(real / seconds, 1), "seconds": round(seconds, 3), "batches": len(batches),
            "real_tokens": real, "positions": total, "token_fraction": round(sum(fractions) / len(fractions), 4),
            "min_token_fraction": round(min(fractions), 4), "dense_attention_scores": dense_scores}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_train", description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=160)
    parser.add_argument("--max-length", type=int, default=512, help="packed row length (samples cut to it)")
    parser.add_argument("--batch-size", type=int, default=8, help="unpacked rows (samples) per step")
    parser.add_argument("--packed-rows", type=int, default=2, help="packed rows per step")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jzlake.settings import load_settings
    from models.tiny import ensure_tiny_model
    from models.train import data

    torch.set_num_threads(args.threads)
    path = ensure_tiny_model(load_settings())
    tokenizer = AutoTokenizer.from_pretrained(path)
    samples = training_samples(tokenizer, args.samples, args.max_length)
    lengths = sorted(len(s) for s in samples)
    results = {}
    for layout in ("unpacked", "packed"):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(args.device).train()
        if layout == "packed":
            batches = data.global_batches(data.pack_rows(samples, args.max_length), args.packed_rows)
        else:
            batches = data.global_batches(data.single_rows(samples), args.batch_size)
        results[layout] = run_epoch(model, batches, tokenizer.pad_token_id, layout == "packed", args.device)
        print(f"{layout}: {results[layout]['tokens_per_s']} tokens/s, non-pad fraction "
              f"{results[layout]['token_fraction']}", file=sys.stderr)
    speedup = results["packed"]["tokens_per_s"] / results["unpacked"]["tokens_per_s"]
    # varlen (flash-attention) computes only within-sample scores; CPU sdpa masks a dense row
    varlen_scores = sum(len(s) ** 2 for s in samples)
    summary = {
        "benchmark": "train", "device": args.device, "threads": args.threads, "samples": len(samples),
        "sample_tokens": {"min": lengths[0], "median": lengths[len(lengths) // 2], "max": lengths[-1]},
        "max_length": args.max_length, "unpacked_batch_size": args.batch_size, "packed_rows": args.packed_rows,
        "unpacked": results["unpacked"], "packed": results["packed"],
        "packed_speedup": round(speedup, 3), "packed_token_fraction": results["packed"]["token_fraction"],
        "unpacked_token_fraction": results["unpacked"]["token_fraction"],
        "positions_ratio_unpacked_over_packed": round(
            results["unpacked"]["positions"] / results["packed"]["positions"], 3),
        "attention_scores": {"unpacked_dense": results["unpacked"]["dense_attention_scores"],
                             "packed_dense": results["packed"]["dense_attention_scores"],
                             "packed_varlen": varlen_scores},
        "meets_speedup_target": speedup >= 1.2,
        "meets_token_fraction_target": results["packed"]["token_fraction"] >= 0.9,
    }
    print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
