"""Candidates, targets and their tokenisation for LESS.

A *unit* is what gets a gradient: ``prompt`` (may be empty) + ``completion``; the loss covers
the completion tokens only. Candidate units:

* ``excerpt`` — the document's excerpt (≤ ``excerpt_chars``, cut on a sentence/formula boundary
  by ``models.generation.excerpts.cut_excerpt``); no prompt, so the LM loss covers all its text;
* ``pair``    — (synthesis prompt, problem–solution written by the current synthesizer) rows; the
  loss covers the generated problem–solution and the unit's score is attributed to ``doc_id``
  (mean over the doc's units).

Targets are benchmark examples in the training format (``## Question\\n…\\n\\n## Solution\\n``
as prompt, the solution as completion), ``targets_per_subtask`` per subtask (seeded sample),
ordered by subtask: scoring reshapes the target axis to (subtask, example).
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from jzlake.settings import InfluenceSettings, Settings

T = TypeVar("T")
TRAIN_PROMPT = "## Question\n{question}\n\n## Solution\n"
IGNORE = -100


@dataclass(frozen=True)
class Unit:
    """One example to take a gradient of: ``prompt`` is context, ``completion`` carries the loss."""

    unit_id: str
    doc_id: str
    prompt: str
    completion: str


@dataclass(frozen=True)
class TargetExample:
    subtask: str
    item_id: str
    prompt: str
    completion: str


@dataclass(frozen=True)
class Encoded:
    """Token ids and next-token targets (``targets[t]`` is predicted at position ``t``; -100 = no loss)."""

    input_ids: list[int]
    targets: list[int]

    @property
    def n_loss_tokens(self) -> int:
        return sum(1 for t in self.targets if t != IGNORE)


# ---- candidates ---------------------------------------------------------------------------------

def cut(text: str, max_chars: int) -> tuple[str, int, int] | None:
    """The excerpt used for scoring and for the teacher prompt: ``(text, start, end)`` or ``None``."""
    from models.generation.excerpts import cut_excerpt

    excerpt = cut_excerpt(text, max_chars=max_chars)
    if excerpt is None or not excerpt.text.strip():
        return None
    return excerpt.text, excerpt.start, excerpt.end


def documents_from_corpus(rows: Iterable[Mapping[str, Any]], excerpt_chars: int
                          ) -> tuple[list[dict[str, Any]], Counter]:
    """Corpus rows → documents with their excerpt (sorted by ``doc_id``) and skip counts by reason."""
    documents: list[dict[str, Any]] = []
    skipped: Counter = Counter()
    for row in sorted(rows, key=lambda r: r["doc_id"]):
        text = row.get("text") or ""
        if not text.strip():
            skipped["empty_text"] += 1
            continue
        piece = cut(text, excerpt_chars)
        if piece is None:
            skipped["no_excerpt_boundary"] += 1  # cap falls inside a formula that starts the text
            continue
        excerpt, start, end = piece
        documents.append({"doc_id": row["doc_id"], "source": row.get("source"), "excerpt": excerpt,
                          "excerpt_start": start, "excerpt_end": end})
    return documents, skipped


def excerpt_units(documents: Sequence[Mapping[str, Any]]) -> list[Unit]:
    """One unit per document: its excerpt, no prompt (LM loss on all of its tokens)."""
    return [Unit(unit_id=d["doc_id"], doc_id=d["doc_id"], prompt="", completion=d["excerpt"])
            for d in documents]


def pair_units(rows: Iterable[Mapping[str, Any]], columns: Mapping[str, str],
               known_docs: set[str]) -> tuple[list[Unit], Counter]:
    """(prompt, generated problem–solution) rows → units keyed ``<doc_id>#<n>`` (sorted, stable)."""
    units: list[Unit] = []
    skipped: Counter = Counter()
    per_doc: Counter = Counter()
    keyed = []
    for row in rows:
        doc_id, prompt, completion = (row.get(columns[k]) for k in ("doc_id", "prompt", "completion"))
        if not doc_id or not completion or not str(completion).strip():
            skipped["pair_missing_fields"] += 1
            continue
        if doc_id not in known_docs:
            skipped["pair_doc_not_in_corpus"] += 1
            continue
        keyed.append((doc_id, prompt or "", completion))
    for doc_id, prompt, completion in sorted(keyed):
        units.append(Unit(unit_id=f"{doc_id}#{per_doc[doc_id]}", doc_id=doc_id, prompt=prompt,
                          completion=completion))
        per_doc[doc_id] += 1
    return units, skipped


def read_rows_file(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a Parquet or JSONL file (the ``pairs_path`` input)."""
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def warmup_subset(items: Sequence[T], fraction: float, minimum: int, seed: int) -> list[T]:
    """The seeded random warm-up sample (LESS: 5% of the candidate pool), in a stable order."""
    count = min(len(items), max(minimum, round(fraction * len(items))))
    chosen = random.Random(seed).sample(range(len(items)), count)
    return [items[i] for i in sorted(chosen)]


def shard_documents(doc_ids: Sequence[str], shard_index: int, num_shards: int) -> set[str]:
    """Documents of one shard: every ``num_shards``-th of the sorted ids (balances lengths)."""
    return {d for i, d in enumerate(sorted(doc_ids)) if i % num_shards == shard_index}


# ---- targets ------------------------------------------------------------------------------------

def _load_jsonl(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, list) else list(data.values())
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def load_targets(settings: Settings, config: InfluenceSettings,
                 fits: Callable[[TargetExample], bool] | None = None) -> list[TargetExample]:
    """``targets_per_subtask`` examples per subtask from every configured target, ordered by subtask.

    ``fits`` (the job passes "leaves completion tokens within ``max_seq_len``") excludes examples
    before the draw: a target without loss tokens has a zero gradient, and its zero similarity
    would pull its subtask's mean toward 0 for every candidate.
    """
    if not config.targets:
        raise ValueError("influence.targets is empty: configure at least one target benchmark "
                         "(see jzlake/defaults.yaml, influence.targets)")
    by_subtask: dict[str, list[TargetExample]] = {}
    for name, target in sorted(config.targets.items()):
        path = Path(settings.path(target.path))
        if not path.is_file():
            raise FileNotFoundError(f"target set {name}: {path} does not exist; fix influence.targets.{name}.path")
        for index, row in enumerate(_load_jsonl(path)):
            question, solution = row.get(target.question_field), row.get(target.solution_field)
            if not question or not solution:
                continue
            subtask = name if not target.subtask_field else f"{name}/{row.get(target.subtask_field)}"
            item_id = str(row.get("unique_id") or row.get("id") or f"{name}:{index}")
            example = TargetExample(subtask, item_id, TRAIN_PROMPT.format(question=str(question).strip()),
                                    str(solution).strip())
            pool = by_subtask.setdefault(subtask, [])
            if fits is None or fits(example):
                pool.append(example)
    n = config.targets_per_subtask
    short = {s: len(v) for s, v in by_subtask.items() if len(v) < n}
    if short:
        raise ValueError(f"target subtasks {short} have fewer than targets_per_subtask={n} usable examples "
                         "(an example whose prompt fills influence.max_seq_len is not usable); lower "
                         "influence.targets_per_subtask, raise influence.max_seq_len or add examples")
    examples: list[TargetExample] = []
    for subtask in sorted(by_subtask):
        pool = by_subtask[subtask]
        picked = random.Random(f"{config.seed}:{subtask}").sample(range(len(pool)), n)
        examples.extend(pool[i] for i in sorted(picked))
    return examples


def subtask_names(targets: Sequence[TargetExample]) -> list[str]:
    """Subtasks in target order (each appears as one contiguous, equal-sized block)."""
    return list(dict.fromkeys(t.subtask for t in targets))


# ---- tokenisation -------------------------------------------------------------------------------

def encode(tokenizer: Any, prompt: str, completion: str, max_len: int) -> Encoded:
    """``<bos> prompt completion <eos>`` truncated to ``max_len``; loss on completion (+eos) tokens."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        completion_ids = [*completion_ids, tokenizer.eos_token_id]
    ids = (bos + prompt_ids + completion_ids)[:max_len]
    first_loss = len(bos) + len(prompt_ids)  # position of the first completion token
    targets = [ids[t + 1] if t + 1 >= first_loss else IGNORE for t in range(len(ids) - 1)] + [IGNORE]
    return Encoded(ids, targets)


def collate(batch: Sequence[Encoded], pad_id: int) -> tuple[Any, Any]:
    """Right-padded ``input_ids`` and ``targets`` tensors. No attention mask is needed: attention is
    causal, so padding after a sequence cannot change its positions, and padded targets are -100."""
    import torch

    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    targets = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    for row, example in enumerate(batch):
        ids[row, :len(example.input_ids)] = torch.tensor(example.input_ids)
        targets[row, :len(example.targets)] = torch.tensor(example.targets)
    return ids, targets
