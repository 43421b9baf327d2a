"""``jzlake train synthesizer`` / ``python -m models.train.synthesizer``: fine-tune the synthesizer.

Recipe (JiuZhang3.0 §2.3): every row of ``gold.kd_dataset`` (both KD rounds: the union) at one
pinned Delta version is one example —

* **prompt**: the exact chat the teacher was sent (``gold.kd_requests.messages`` of the row's
  request key: the education-stage template rendered over the excerpt), through the base
  model's chat template with the generation prompt, as a server renders it at synthesis time;
* **target**: the teacher's problem and solution in the reply format the templates ask for and
  ``models/generation/parsing.py`` reads (``## Problem`` / ``## Solution``, or ``## Code
  Solution`` + ``## Final Answer`` for tool samples), then EOS; the loss is on these tokens only.

**Format seed** (``train.synthesizer.format_seed``, on only when configured; the embedded
default turns it on because its KD set is made by the untrained tiny model): real GSM8K train
pairs rendered through the same education-stage (CoT) prompts — the excerpt is another pair's
question, the target the pair itself — so a tiny synthesizer learns the output format. The
summary and the registered version (tag ``format_seed``) say whether it was used.

Full fine-tune or LoRA, epochs, batch, max length, lr: ``train.synthesizer.{gpu,cpu}`` (GPU =
the paper's: DeepSeekMath-7B-RL, lr 1e-5, 5 epochs, global batch 32, 2048 tokens, bf16). Samples
are shuffled per epoch with the seed; see ``models/train/job.py`` for the rest of the run.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections import Counter
from collections.abc import Sequence
from typing import Any

from jzlake.settings import Settings, SynthesizerTrainSettings
from models.train import data
from models.train.job import Example, JobOptions, TrainingInputs, run_training

KD_TABLE = "gold.kd_dataset"
KD_LEDGER = "gold.kd_requests"
KD_COLUMNS = ["request_key", "problem", "solution", "answer", "kind", "template_id"]


def synthesizer_reply(kind: str, problem: str, solution: str, answer: str | None) -> str:
    """The reply the education-stage templates ask for (what ``parse_reply`` accepts)."""
    if kind == "tool":
        return (f"## Problem\n{problem.strip()}\n\n## Code Solution\n```python\n{solution.strip()}\n```\n\n"
                f"## Final Answer\n\\boxed{{{answer}}}")
    return f"## Problem\n{problem.strip()}\n\n## Solution\n{solution.strip()}"


def kd_examples(kd_rows: Sequence[dict[str, Any]], messages_by_key: dict[str, str]) -> list[Example]:
    """One example per KD row (sorted by request key), its prompt from the ledger's messages."""
    missing = [r["request_key"] for r in kd_rows if r["request_key"] not in messages_by_key]
    if missing:
        raise data.TrainingInputError(
            f"{len(missing)} {KD_TABLE} rows have no request in {KD_LEDGER} (e.g. {missing[0]}): the prompt "
            "cannot be rebuilt; rerun `jzlake distil` (it writes both tables)")
    examples = []
    for row in sorted(kd_rows, key=lambda r: r["request_key"]):
        chat = json.loads(messages_by_key[row["request_key"]])
        messages = tuple({"role": m["role"], "content": m["content"]} for m in chat)
        target = synthesizer_reply(row["kind"] or "cot", row["problem"] or "", row["solution"] or "", row["answer"])
        examples.append(Example(target=target, source=f"{KD_TABLE}:{row['template_id']}", messages=messages))
    return examples


def format_seed_examples(settings: Settings, config: SynthesizerTrainSettings
                         ) -> tuple[list[Example], dict[str, str]]:
    """GSM8K pairs through the CoT education-stage templates (see the module docstring)."""
    from models.generation.prompt_library import seeded_rng, templates_for

    templates = templates_for(settings.prompts, settings.home)
    cot = [t for t in settings.prompts.stages if templates[t].kind == "cot"] or \
        [t for t in sorted(templates) if templates[t].kind == "cot"]
    pairs = [pair for pair in data.read_problem_pairs(config.format_seed_paths, settings.home)
             if config.format_seed_max_chars is None or len(pair[1]) + len(pair[2]) <= config.format_seed_max_chars]
    if len(pairs) < 2:
        raise data.TrainingInputError(f"format seed: {len(pairs)} pairs in {config.format_seed_paths} fit "
                                      f"train.synthesizer.format_seed_max_chars={config.format_seed_max_chars}; "
                                      "raise it or add files")
    chosen = data.seeded_shuffle(range(len(pairs)), config.seed, "format-seed")[:config.format_seed_samples]
    examples = []
    for n, index in enumerate(chosen):
        _, question, solution = pairs[index]
        excerpt = pairs[chosen[(n + 1) % len(chosen)]][1]  # inspiration: another problem, never the target
        template = templates[seeded_rng(config.seed, question, "format-seed").choice(cot)]
        messages = tuple({"role": role, "content": content} for role, content in template.render(excerpt))
        examples.append(Example(target=synthesizer_reply("cot", question, solution, None),
                                source=f"format_seed:{template.id}", messages=messages))
    files = sorted({p for p, _, _ in pairs})
    return examples, {p: hashlib.sha256(open(p, "rb").read()).hexdigest() for p in files}


def read_inputs(settings: Settings, config: SynthesizerTrainSettings) -> TrainingInputs:
    """KD rows at the pinned version (+ the format seed); a missing or empty table is an error."""
    from models import lake_io

    if lake_io.current_version(settings, KD_TABLE) is None:
        raise data.TrainingInputError(f"{KD_TABLE} does not exist in {settings.lake_root}: run `jzlake distil` first")
    kd, version = lake_io.read_table_at(settings, KD_TABLE, config.input_version, columns=KD_COLUMNS)
    notes: dict[str, Any] = {}
    if kd.num_rows == 0:
        if not config.format_seed:
            raise data.TrainingInputError(f"{KD_TABLE} is empty at version {version}: run `jzlake distil` first "
                                          "(with a teacher whose replies parse)")
        # The embedded default's tiny teacher may get no reply accepted: the seed alone teaches the format.
        notes["warning"] = f"{KD_TABLE}@{version} is empty: trained on the format seed only"
    kd_rows = kd.to_pylist()
    messages: dict[str, str] = {}
    ledger_version = lake_io.current_version(settings, KD_LEDGER)
    if kd_rows:
        ledger, ledger_version = lake_io.read_table_at(settings, KD_LEDGER, columns=["key", "messages"])
        messages = dict(zip(ledger.column("key").to_pylist(), ledger.column("messages").to_pylist(), strict=True))
    examples = kd_examples(kd_rows, messages)
    counts = dict(Counter(f"kd_{r['kind'] or 'cot'}" for r in kd_rows))
    files: dict[str, str] = {}
    if config.format_seed:
        seed_examples, files = format_seed_examples(settings, config)
        examples += seed_examples
        counts["format_seed"] = len(seed_examples)
    tables = {KD_TABLE: version, **({KD_LEDGER: ledger_version} if ledger_version is not None else {})}
    return TrainingInputs(examples=examples, data_tables=tables,
                          data_files=files, counts=counts, notes=notes, format_seed=config.format_seed, chat=True,
                          shuffle=True)


def run(settings: Settings, options: JobOptions | None = None) -> dict[str, Any]:
    """Train (or find) the synthesizer for the pinned KD set; the JSON summary."""
    config = settings.train.synthesizer
    return run_training(settings, "synthesizer", config, lambda: read_inputs(settings, config), options)


def main(argv: Sequence[str] | None = None) -> int:
    from models.train.cli import run_job_main

    return run_job_main("synthesizer", argv)


if __name__ == "__main__":
    sys.exit(main())
