"""The training core alone: WSD corners, sample labels, packing isolation, order, micro-batching."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest

from models.train import data
from models.train.schedule import wsd_boundaries, wsd_factor, wsd_scheduler
from tests.conftest import make_settings

# ---- WSD ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("total", [100, 1000, 37])
def test_wsd_corners(total: int) -> None:
    warmup, decay = math.ceil(0.03 * total), math.floor(0.85 * total)
    assert wsd_boundaries(total, 0.03, 0.85) == (warmup, decay)
    assert wsd_factor(0, total) == 0.0                                   # 0%: warm-up starts at 0
    assert wsd_factor(warmup, total) == 1.0                              # 3%: peak reached
    assert wsd_factor(warmup // 2, total) == pytest.approx((warmup // 2) / warmup)
    assert wsd_factor(decay - 1, total) == 1.0 and wsd_factor(decay, total) == 1.0  # 85%: decay starts
    assert wsd_factor(total, total) == pytest.approx(0.1)               # 100%: 0.1 × peak
    midway = (decay + total) / 2
    assert wsd_factor(int(midway), total) == pytest.approx(1 - 0.9 * (int(midway) - decay) / (total - decay))


def test_wsd_scheduler_gives_the_peak_scaled_lr_per_step() -> None:
    import torch

    peak, total = 1e-5, 200
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    scheduler = wsd_scheduler(optimizer, total, 0.03, 0.85, 0.1)
    lrs = []
    for _ in range(total):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == 0.0 and lrs[6] == pytest.approx(peak) and lrs[3] == pytest.approx(peak / 2)
    assert lrs[169] == pytest.approx(peak) and lrs[170] == pytest.approx(peak)
    assert lrs[185] == pytest.approx(peak * (1 - 0.9 * 15 / 30))
    assert scheduler.get_last_lr()[0] == pytest.approx(0.1 * peak)      # after the last step
    assert all(b <= a + 1e-18 for a, b in itertools.pairwise(lrs[170:])), "decay is monotone"


def test_wsd_refuses_a_bad_configuration() -> None:
    with pytest.raises(ValueError, match="warmup_ratio"):
        wsd_boundaries(10, 0.9, 0.5)
    with pytest.raises(ValueError, match="at least one step"):
        wsd_boundaries(0, 0.03, 0.85)


# ---- samples ------------------------------------------------------------------------------------

def test_sample_takes_loss_on_target_and_eos_only() -> None:
    sample, truncated = data.make_sample([1, 2, 3], [10, 11], eos_id=99, max_length=16)
    assert sample.input_ids == (1, 2, 3, 10, 11, 99)
    assert sample.labels == (data.IGNORE, data.IGNORE, data.IGNORE, 10, 11, 99) and not truncated
    cut, truncated = data.make_sample([1, 2, 3], [10, 11, 12, 13], eos_id=99, max_length=5)
    assert cut.input_ids == (1, 2, 3, 10, 11) and truncated
    whole, _ = data.make_sample([], [10, 11], eos_id=99, max_length=8)
    assert whole.labels[0] == data.IGNORE, "the first token never takes a loss (no cross-sample prediction)"
    with pytest.raises(data.TrainingInputError, match="the prompt is 4 tokens, max_length is 5"):
        data.make_sample([1, 2, 3, 4], [10], eos_id=99, max_length=5)


def test_gsm8k_solution_loses_annotations_and_gets_a_boxed_answer() -> None:
    solution, final = data.gsm8k_solution("She sold 48/2 = <<48/2=24>>24 clips.\n#### 1,072")
    assert final == "1072"
    assert solution == "She sold 48/2 = 24 clips.\nThe answer is $\\boxed{1072}$."


# ---- packing ------------------------------------------------------------------------------------

def _samples(lengths: list[int]) -> list[data.Sample]:
    return [data.make_sample([1], list(range(5 + i, 5 + i + n - 2)), 2, 64)[0] for i, n in enumerate(lengths)]


def test_pack_rows_keeps_order_and_restarts_positions() -> None:
    samples = _samples([5, 7, 4, 9, 3])
    rows = data.pack_rows(samples, max_length=16, window=1)
    assert [r.n_samples for r in rows] == [3, 2]
    flat = [tok for r in rows for tok in r.input_ids]
    assert flat == [tok for s in samples for tok in s.input_ids], "packing never reorders"
    assert rows[0].position_ids == (0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3)
    batch = data.collate(rows, pad_id=0, packed=True)
    assert "attention_mask" not in batch and batch["input_ids"].shape == (2, 16)
    assert batch["position_ids"][1].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 2, 0, 1, 2, 3]
    assert (batch["labels"][1, 12:] == data.IGNORE).all(), "the pad tail takes no loss"
    segments = data.segment_ids(batch["position_ids"])
    assert segments[1].tolist() == [1] * 9 + [2] * 3 + [3] * 4


def test_windowed_packing_fills_gaps_and_keeps_order_inside_rows() -> None:
    samples = _samples([10, 10, 5, 6, 4, 12])
    sequential = data.pack_rows(samples, max_length=16, window=1)
    windowed = data.pack_rows(samples, max_length=16, window=2)
    assert [len(r) for r in sequential] == [10, 15, 10, 12] and [len(r) for r in windowed] == [15, 16, 16]
    firsts = {s.input_ids: i for i, s in enumerate(samples)}
    assert sorted(tok for r in windowed for tok in r.input_ids) == sorted(t for s in samples for t in s.input_ids)
    for row in windowed:  # samples inside a row stay in data order
        starts = [i for i, p in enumerate(row.position_ids) if p == 0]
        bounds = [*starts, len(row)]
        order = [firsts[row.input_ids[a:b]] for a, b in itertools.pairwise(bounds)]
        assert order == sorted(order)


def test_micro_batches_split_a_global_batch_over_processes() -> None:
    rows = data.single_rows(_samples([3, 4, 5, 6, 7]))
    assert [[len(r) for r in mb] for mb in data.micro_batches(rows, 2)] == [[3, 4], [5, 6], [7]]
    rank0 = data.micro_batches(rows, 2, rank=0, world_size=2)
    rank1 = data.micro_batches(rows, 2, rank=1, world_size=2)
    assert [[len(r) for r in mb] for mb in rank0] == [[3, 5], [7]]
    assert [[len(r) for r in mb] for mb in rank1] == [[4, 6]]


def test_epoch_order_is_seeded_and_differs_per_epoch() -> None:
    samples = _samples([3, 4, 5, 6, 7, 8, 9, 10])
    order = data.epoch_order(samples, 2, seed=1)
    assert order == data.epoch_order(samples, 2, seed=1)
    assert order[:8] != order[8:] and sorted(order[:8], key=len) == samples
    assert data.epoch_order(samples, 1, seed=1, shuffle=False) == samples


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, object]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from models.tiny import ensure_tiny_model

    path = ensure_tiny_model(make_settings(tmp_path_factory.mktemp("tiny")))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("explicit", [False, True], ids=["position-ids", "explicit-4d-mask"])
def test_packed_samples_never_attend_across_boundaries(tiny: tuple[object, object], explicit: bool) -> None:
    """Logits of each sample inside a packed row equal the sample run alone (the same logits at
    every position), and differ from a naive concatenation (which does attend across)."""
    import torch

    model, tokenizer = tiny
    texts = ["Tom has 3 apples and buys 5 more.", "## Question\nWhat is 7 times 8?\n\n## Solution\n56",
             "x", "The sum of the angles of a triangle is 180 degrees, so the third angle is 40."]
    samples = [data.make_sample([tokenizer.bos_token_id], tokenizer(t, add_special_tokens=False)["input_ids"],
                                tokenizer.eos_token_id, 128)[0] for t in texts]
    rows = data.pack_rows(samples, max_length=64)
    assert rows[0].n_samples >= 3
    batch = data.collate(rows, tokenizer.pad_token_id, packed=True)
    kwargs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    if explicit:
        kwargs["attention_mask"] = data.packing_attention_mask(batch["position_ids"], torch.float32)
    with torch.no_grad():
        packed = model(**kwargs).logits
        naive = model(input_ids=batch["input_ids"], use_cache=False).logits
        offset = 0
        row = 0
        for sample in samples:
            if offset + len(sample) > len(rows[row]):
                row, offset = row + 1, 0
            alone = model(input_ids=torch.tensor([sample.input_ids]), use_cache=False).logits[0]
            inside = packed[row, offset:offset + len(sample)]
            assert torch.allclose(inside, alone, atol=1e-4), f"sample {sample.input_ids[:5]} saw another sample"
            if offset > 0:
                assert not torch.allclose(naive[row, offset:offset + len(sample)], alone, atol=1e-2)
            offset += len(sample)


def test_packed_loss_equals_the_sum_of_per_sample_losses(tiny: tuple[object, object]) -> None:
    """The training loss on a packed micro-batch equals the per-sample losses summed."""
    import torch

    from models.train.loop import _micro_loss

    model, tokenizer = tiny
    texts = ["one two three four five", "The answer is 42.", "six seven eight"]
    samples = [data.make_sample([tokenizer.bos_token_id, 5, 6], tokenizer(t, add_special_tokens=False)["input_ids"],
                                tokenizer.eos_token_id, 64)[0] for t in texts]
    with torch.no_grad():
        packed = _micro_loss(model, data.collate(data.pack_rows(samples, 64), tokenizer.pad_token_id, True), False)
        padded = _micro_loss(model, data.collate(data.single_rows(samples), tokenizer.pad_token_id, False), False)
        alone = sum(_micro_loss(model, data.collate(data.single_rows([s]), tokenizer.pad_token_id, False), False)
                    for s in samples)
    assert packed.item() == pytest.approx(alone.item(), rel=1e-5)
    assert padded.item() == pytest.approx(alone.item(), rel=1e-5)


def test_read_problem_pairs_reads_gsm8k_and_math_and_names_missing_files(tmp_path: Path) -> None:
    (tmp_path / "math.jsonl").write_text('{"problem": "P?", "solution": "S \\\\boxed{1}"}\n')
    (tmp_path / "gsm.jsonl").write_text('{"question": "Q?", "answer": "A <<1+1=2>>2\\n#### 2"}\n')
    pairs = list(data.read_problem_pairs([str(tmp_path / "gsm.jsonl"), str(tmp_path / "math.jsonl")], str(tmp_path)))
    assert [(q, s) for _, q, s in pairs] == [("Q?", "A 2\nThe answer is $\\boxed{2}$."), ("P?", "S \\boxed{1}")]
    with pytest.raises(data.TrainingInputError, match=r"no file matches 'absent/\*\.jsonl'"):
        list(data.read_problem_pairs(["absent/*.jsonl"], str(tmp_path)))
