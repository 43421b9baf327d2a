"""``jzlake train jiuzhang`` / ``python -m models.train.jiuzhang``: train the JiuZhang math model.

Recipe (JiuZhang3.0 §2.4), one run, one epoch by default:

1. **pre-training data** — every row of ``gold.synthetic_problems`` (CoT and tool problems) at a
   pinned Delta version, sorted by request key then shuffled with the seed;
2. followed, **in order**, by the **SFT data** — ``train.jiuzhang.sft_sources`` (JSONL globs of
   GSM8K question/answer or MATH problem/solution rows; the repo's GSM8K train sample by
   default), file order kept.

Every example is ``## Question\\n{problem}\\n\\n## Solution\\n`` (``## Code Solution`` for tool
problems) as the prompt and the solution as the target, the format of ``gold.synthetic_problems``'
``text``; the loss is on the solution (the output) only. GSM8K answers lose their calculator
annotations and end with ``\\boxed{answer}``. Samples are packed to the max length (attention kept
inside each sample, ``models/train/data.py``) without reordering; the WSD schedule warms up over
3% of the steps, stays at the peak (1e-5 on GPU) until 85%, then decays linearly to 0.1 × peak.
"""

from __future__ import annotations

import hashlib
import sys
from collections import Counter
from collections.abc import Sequence
from typing import Any

from jzlake.settings import JiuzhangTrainSettings, Settings
from models.train import data
from models.train.job import Example, JobOptions, TrainingInputs, run_training

PROBLEMS = "gold.synthetic_problems"
HEADINGS = ("\n\n## Code Solution\n", "\n\n## Solution\n")


def split_training_text(text: str) -> tuple[str, str]:
    """``(prompt, target)`` of a training-format text: the question up to and including the
    solution heading, then the solution. Text without the heading is all target."""
    cuts = [(text.find(h), h) for h in HEADINGS if text.find(h) >= 0]
    if not cuts:
        return "", text
    index, heading = min(cuts)
    return text[:index + len(heading)], text[index + len(heading):]


def synthetic_examples(rows: Sequence[dict[str, Any]], seed: int) -> list[Example]:
    """The pre-training part: one example per problem, seeded shuffle over request-key order."""
    ordered = data.seeded_shuffle(sorted(rows, key=lambda r: r["request_key"]), seed, "cpt")
    examples = []
    for row in ordered:
        prompt, target = split_training_text(row["text"] or "")
        if target.strip():
            examples.append(Example(target=target, source=f"{PROBLEMS}:{row.get('kind') or 'cot'}", prompt=prompt))
    return examples


def sft_examples(settings: Settings, config: JiuzhangTrainSettings) -> tuple[list[Example], dict[str, str]]:
    """The SFT part, in file order (optionally the first ``max_sft_samples``)."""
    examples, files = [], set()
    for path, question, solution in data.read_problem_pairs(config.sft_sources, settings.home):
        files.add(path)
        examples.append(Example(target=solution, source=f"sft:{path.rsplit('/', 1)[-1]}",
                                prompt=data.SFT_PROMPT.format(question=question)))
        if config.max_sft_samples is not None and len(examples) >= config.max_sft_samples:
            break
    return examples, {p: hashlib.sha256(open(p, "rb").read()).hexdigest() for p in sorted(files)}


def read_inputs(settings: Settings, config: JiuzhangTrainSettings) -> TrainingInputs:
    """Synthetic problems at the pinned version, then SFT pairs; a missing/empty table is an error."""
    from models import lake_io

    stage = "`jzlake synthesize` then `jzlake filter-synthetic`"
    if lake_io.current_version(settings, PROBLEMS) is None:
        raise data.TrainingInputError(f"{PROBLEMS} does not exist in {settings.lake_root}: run {stage} first")
    table, version = lake_io.read_table_at(settings, PROBLEMS, config.input_version,
                                           columns=["request_key", "text", "kind"])
    if table.num_rows == 0:
        raise data.TrainingInputError(f"{PROBLEMS} is empty at version {version}: run {stage} first")
    rows = table.to_pylist()
    pretraining = synthetic_examples(rows, config.seed)
    sft, files = sft_examples(settings, config) if config.sft_sources else ([], {})
    counts = {**{f"cpt_{k}": n for k, n in Counter(r["kind"] or "cot" for r in rows).items()},
              "cpt_examples": len(pretraining), "sft_examples": len(sft)}
    return TrainingInputs(examples=pretraining + sft, data_tables={PROBLEMS: version}, data_files=files,
                          counts=counts, chat=False, shuffle=False)


def run(settings: Settings, options: JobOptions | None = None) -> dict[str, Any]:
    """Train (or find) the JiuZhang model for the pinned inputs; the JSON summary."""
    config = settings.train.jiuzhang
    return run_training(settings, "jiuzhang", config, lambda: read_inputs(settings, config), options)


def main(argv: Sequence[str] | None = None) -> int:
    from models.train.cli import run_job_main

    return run_job_main("jiuzhang", argv)


if __name__ == "__main__":
    sys.exit(main())
