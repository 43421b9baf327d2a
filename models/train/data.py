"""Training samples, their order, and how they become batches (packed or padded).

A **sample** is ``(prompt ids, target ids)`` tokenized once: labels are ``-100`` on the prompt
and on the first token of every sample (it is never predicted from inside its own sample, so a
packed row cannot learn across a boundary), the target is followed by EOS, and the loss is taken
on target tokens only.

**Packing** (``pack_rows``) fills rows of at most ``max_length`` tokens first-fit over a small
window of open rows (order kept up to that window: CPT data stays before SFT data). Each row carries position ids
that restart at 0 for every sample. With no 2-D attention mask, ``transformers`` (≥ 4.53, here
5.x; ``masking_utils.find_packed_sequence_indices``) reads the restarts as sequence boundaries:
sdpa/eager/flex get a block-diagonal causal mask and flash-attention its varlen path
(``cu_seq_lens`` from the position ids), so packed samples never attend to each other. The
explicit fallback (``packing_attention_mask``) builds the same block-diagonal mask as a 4-D
additive mask for attention paths that do not detect packing; the tests check both against each
sample run alone. Rows shorter than the longest in a micro-batch are padded with a separate
segment (positions restarting at 0, no loss).

**Unpacked** batches (``pad_rows``) hold one sample per row, right-padded to the longest row of
the micro-batch with a 2-D attention mask — the baseline of ``benchmarks/bench_train.py``.
"""

from __future__ import annotations

import glob
import json
import random
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

IGNORE = -100
# Open rows first-fit packing may fill at once: more fills gaps better, fewer keeps the order tighter.
PACK_WINDOW = 8


class TrainingInputError(ValueError):
    """Training cannot start on these inputs; the message names the input, the rule and the fix."""


@dataclass(frozen=True)
class Sample:
    """One tokenized training example; ``labels[i] == IGNORE`` means no loss on token ``i``."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    source: str = ""

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_target_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE)


# ---- tokenization -------------------------------------------------------------------------------

def require_chat_template(tokenizer: Any, model_ref: str) -> None:
    """Refuse a tokenizer without a chat template (the synthesizer's prompt needs one)."""
    if not getattr(tokenizer, "chat_template", None):
        raise TrainingInputError(
            f"the tokenizer of {model_ref} has no chat template, so the synthesizer's prompt cannot be "
            "rendered the way it is served; use a chat model's tokenizer or add `chat_template` to its "
            "tokenizer_config.json")


def chat_prompt_ids(tokenizer: Any, messages: Sequence[dict[str, str]]) -> list[int]:
    """The chat-templated prompt (with the generation prompt) as token ids, as a server renders it."""
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def text_ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def make_sample(prompt_ids: Sequence[int], target_ids: Sequence[int], eos_id: int, max_length: int,
                source: str = "", what: str = "sample") -> tuple[Sample, bool]:
    """``(sample, truncated)``: prompt + target + EOS, the target cut to fit ``max_length``.

    A prompt that leaves no room for a single target token is an error (raised before any
    compute): the configured max length is shorter than the prompt."""
    if len(prompt_ids) + 1 >= max_length:
        raise TrainingInputError(
            f"{what}: the prompt is {len(prompt_ids)} tokens, max_length is {max_length}: no room for the "
            "target; raise train.<job>.<device>.max_length or shorten the prompt")
    target = [*target_ids, eos_id]
    room = max_length - len(prompt_ids)
    truncated = len(target) > room
    target = target[:room]
    ids = (*prompt_ids, *target)
    labels = (IGNORE,) * len(prompt_ids) + tuple(target)
    labels = (IGNORE, *labels[1:])  # the first token is never predicted from inside its sample
    return Sample(ids, labels, source), truncated


# ---- order --------------------------------------------------------------------------------------

def seeded_shuffle(items: Sequence[Any], seed: int, salt: str = "") -> list[Any]:
    """A copy of ``items`` in an order that depends only on (items, seed, salt)."""
    order = list(items)
    random.Random(f"{seed}:{salt}").shuffle(order)
    return order


def epoch_order(samples: Sequence[Sample], epochs: int, seed: int, shuffle: bool = True) -> list[Sample]:
    """Every epoch's samples, each epoch shuffled with its own seed (or kept in order)."""
    ordered: list[Sample] = []
    for epoch in range(epochs):
        ordered.extend(seeded_shuffle(samples, seed, f"epoch-{epoch}") if shuffle else samples)
    return ordered


# ---- rows and batches ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Row:
    """One sequence of a batch: one sample, or several packed samples."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    position_ids: tuple[int, ...]
    n_samples: int

    def __len__(self) -> int:
        return len(self.input_ids)


def _row(samples: Sequence[Sample]) -> Row:
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for sample in samples:
        ids.extend(sample.input_ids)
        labels.extend(sample.labels)
        positions.extend(range(len(sample)))
    return Row(tuple(ids), tuple(labels), tuple(positions), len(samples))


def pack_rows(samples: Iterable[Sample], max_length: int, window: int = PACK_WINDOW) -> list[Row]:
    """Samples packed into rows of ≤ ``max_length`` tokens, first fit over the ``window`` most
    recently opened rows (``window=1``: strictly sequential). Rows come out in the order they were
    opened and keep their samples' order, so data order holds up to ``window`` rows."""
    rows: list[list[Sample]] = []
    open_rows: list[tuple[int, int]] = []  # (row index, tokens used), oldest first
    for sample in samples:
        if len(sample) > max_length:
            raise ValueError(f"a {len(sample)}-token sample exceeds max_length {max_length}")
        for slot, (index, used) in enumerate(open_rows):
            if used + len(sample) <= max_length:
                rows[index].append(sample)
                open_rows[slot] = (index, used + len(sample))
                break
        else:
            if len(open_rows) == window:
                open_rows.pop(0)
            rows.append([sample])
            open_rows.append((len(rows) - 1, len(sample)))
    return [_row(r) for r in rows]


def single_rows(samples: Iterable[Sample]) -> list[Row]:
    """One row per sample (the unpacked layout)."""
    return [_row([s]) for s in samples]


def global_batches(rows: Sequence[Row], global_batch_size: int) -> list[list[Row]]:
    """Rows grouped into optimizer steps (the last one may be smaller)."""
    return [list(rows[i:i + global_batch_size]) for i in range(0, len(rows), global_batch_size)]


def micro_batches(rows: Sequence[Row], micro_batch_size: int, rank: int = 0, world_size: int = 1) -> list[list[Row]]:
    """This process's share of one global batch (every ``world_size``-th row), in micro-batches."""
    mine = list(rows[rank::world_size])
    return [mine[i:i + micro_batch_size] for i in range(0, len(mine), micro_batch_size)]


def collate(rows: Sequence[Row], pad_id: int, packed: bool) -> dict[str, Any]:
    """Tensors for one micro-batch, padded to its longest row.

    Packed: ``input_ids``, ``labels``, ``position_ids`` (restarting per sample and for the pad
    tail) and no attention mask. Unpacked: ``attention_mask`` marks the real tokens.
    """
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row)
        ids[i, :n] = torch.tensor(row.input_ids)
        labels[i, :n] = torch.tensor(row.labels)
        positions[i, :n] = torch.tensor(row.position_ids)
        positions[i, n:] = torch.arange(width - n)  # the pad tail is a segment of its own
        mask[i, :n] = 1
    batch = {"input_ids": ids, "labels": labels, "position_ids": positions}
    if not packed:
        batch["attention_mask"] = mask
    return batch


def segment_ids(position_ids: Any) -> Any:
    """Which packed sequence each token belongs to (a new one wherever the position restarts)."""
    import torch

    start = torch.ones_like(position_ids, dtype=torch.bool)
    start[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return start.long().cumsum(-1)


def packing_attention_mask(position_ids: Any, dtype: Any) -> Any:
    """The explicit fallback: a 4-D additive block-diagonal causal mask ``(batch, 1, q, k)``."""
    import torch

    segments = segment_ids(position_ids)
    width = position_ids.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=position_ids.device).tril()
    allowed = (segments[:, :, None] == segments[:, None, :]) & causal
    mask = torch.zeros(allowed.shape, dtype=dtype, device=position_ids.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


# ---- source files -------------------------------------------------------------------------------

_CALCULATOR = re.compile(r"<<[^<>]*>>")
_GSM8K_ANSWER = re.compile(r"\n?####\s*(.+?)\s*$", re.DOTALL)
SFT_PROMPT = "## Question\n{question}\n\n## Solution\n"


def gsm8k_solution(answer: str) -> tuple[str, str]:
    """``(solution, final answer)`` of a GSM8K answer: calculator annotations removed, the
    ``#### X`` line turned into the ``\\boxed{X}`` ending the training format uses."""
    match = _GSM8K_ANSWER.search(answer)
    if not match:
        raise ValueError("not a GSM8K answer: no '#### <answer>' line")
    final = match.group(1).strip().replace(",", "")
    body = _CALCULATOR.sub("", answer[:match.start()]).strip()
    return f"{body}\nThe answer is $\\boxed{{{final}}}$.", final


def read_problem_pairs(patterns: Sequence[str], home: str) -> Iterator[tuple[str, str, str]]:
    """``(source file, question, solution)`` from JSONL files with question/answer (GSM8K) or
    problem/solution (MATH) rows, files in pattern then name order. Missing files are an error."""
    for pattern in patterns:
        path_pattern = pattern if Path(pattern).is_absolute() else str(Path(home) / pattern)
        paths = sorted(glob.glob(path_pattern))
        if not paths:
            raise TrainingInputError(f"no file matches {pattern!r} (under {home}); fix the path or remove it "
                                     "from the configured sources")
        for path in paths:
            for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                row = json.loads(line)
                if "question" in row and "answer" in row:
                    solution, _ = gsm8k_solution(str(row["answer"]))
                    yield path, str(row["question"]).strip(), solution
                elif "problem" in row and "solution" in row:
                    yield path, str(row["problem"]).strip(), str(row["solution"]).strip()
                else:
                    raise TrainingInputError(f"{path}:{n}: need question/answer or problem/solution fields, "
                                             f"got {sorted(row)}")
