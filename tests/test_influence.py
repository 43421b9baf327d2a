"""LESS building blocks on the tiny model: projection, preconditioning, per-example gradients,
scoring, targets and tokenisation."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from jzlake.settings import InfluenceSettings
from models.influence import data, scoring
from models.influence.gradients import (
    adam_precondition,
    gradient_features,
    hidden_state_loss_grad,
    output_head,
    per_example_gradients,
    per_example_loss,
    trainable_parameters,
)
from models.influence.projection import RademacherProjector
from tests.conftest import SAMPLE, make_settings


@pytest.fixture(scope="module")
def lora_model(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    from models.influence.job import load_model
    from models.influence.warmup import attach_lora
    from models.tiny import ensure_tiny_model

    torch.set_num_threads(1)
    settings = make_settings(tmp_path_factory.mktemp("influence-units"))
    model, tokenizer, pad_id = load_model(ensure_tiny_model(settings), "cpu")
    model = attach_lora(model, settings.influence, seed=0)
    with torch.no_grad():  # B starts at 0 (zero A-gradients): give it warm-up-like values
        for name, p in trainable_parameters(model):
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    return model, tokenizer, pad_id


def test_projection_is_seeded_blockwise_and_identical_with_or_without_cache() -> None:
    grads = torch.randn(5, 1000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    cached = RademacherProjector(1000, 256, seed=7, block_rows=96, dtype=torch.float64)
    uncached = RademacherProjector(1000, 256, seed=7, block_rows=96, dtype=torch.float64, cache_bytes=0)
    assert torch.equal(cached.project(grads), uncached.project(grads))
    assert cached._cache and not uncached._cache
    dense = torch.cat([cached.block(i) for i in range(cached.num_blocks)])  # only for this check
    assert dense.shape == (1000, 256) and set(dense.unique().tolist()) == {-1 / 16, 1 / 16}
    assert torch.allclose(cached.project(grads), grads @ dense)
    assert not torch.equal(RademacherProjector(1000, 256, seed=8, block_rows=96).block(0), cached.block(0).float())
    # Johnson–Lindenstrauss: inner products survive the projection approximately.
    big = RademacherProjector(1000, 4096, seed=1, dtype=torch.float64)
    x = grads / grads.norm(dim=1, keepdim=True)
    assert (big.project(x).norm(dim=1) - 1).abs().max() < 0.1


def test_adam_preconditioning_matches_the_formula_without_bias_correction() -> None:
    g, m, v = torch.tensor([[0.5, -2.0]]), torch.tensor([0.1, 0.2]), torch.tensor([0.01, 0.04])
    out = adam_precondition(g, m, v, beta1=0.9, beta2=0.999, eps=1e-8)
    m2 = 0.9 * m + 0.1 * g
    v2 = 0.999 * v + 0.001 * g**2
    assert torch.allclose(out, m2 / torch.sqrt(v2 + 1e-8))


def test_encoding_puts_the_loss_on_completion_tokens_only(lora_model: tuple) -> None:
    _, tokenizer, _ = lora_model
    enc = data.encode(tokenizer, "## Question\nWhat is 2+3?\n\n## Solution\n", "2+3=5. \\boxed{5}", 512)
    prompt_len = 1 + len(tokenizer("## Question\nWhat is 2+3?\n\n## Solution\n", add_special_tokens=False)["input_ids"])
    lossy = [t for t, target in enumerate(enc.targets) if target != data.IGNORE]
    assert lossy[0] == prompt_len - 1  # the last prompt position predicts the first completion token
    assert tokenizer.decode([enc.targets[t] for t in lossy]).startswith("2+3=5.")
    assert enc.targets[-1] == data.IGNORE and enc.input_ids[-1] == tokenizer.eos_token_id
    raw = data.encode(tokenizer, "", "Let $x=1$.", 512)  # raw excerpt: every token after <bos>
    assert raw.n_loss_tokens == len(raw.input_ids) - 1
    assert len(data.encode(tokenizer, "", "word " * 400, 64).input_ids) == 64


def test_batched_per_example_gradients_equal_the_one_backward_per_example_loop(lora_model: tuple) -> None:
    model, tokenizer, pad_id = lora_model
    texts = ["Let $f(x)=x^2$. Then $f'(x)=2x$.", "Natalia sold 48 clips in April.",
             "A group $G$ is abelian if $ab=ba$ for all $a, b$ in $G$, which holds for every cyclic group."]
    batch = [data.encode(tokenizer, "", t, 64) for t in texts]
    batch.append(data.encode(tokenizer, "## Question\nWhat is 3*4?\n\n## Solution\n", "3*4=12", 64))
    loop = per_example_gradients(model, batch, pad_id, "loop")
    assert loop.shape == (4, sum(p.numel() for _, p in trainable_parameters(model)))
    for method in ("factored", "vmap"):
        batched = per_example_gradients(model, batch, pad_id, method)
        cos = torch.nn.functional.cosine_similarity(batched, loop, dim=1)
        assert cos.min() > 0.9999, (method, cos)
        assert torch.allclose(batched, loop, atol=1e-5, rtol=1e-3)
    # Features: chunking and length-sorting do not change them; rows stay in input order.
    projector = RademacherProjector(loop.shape[1], 128, seed=0)
    one = gradient_features(model, batch, projector=projector, pad_id=pad_id, chunk_size=1)
    two = gradient_features(model, batch, projector=projector, pad_id=pad_id, chunk_size=3)
    assert torch.allclose(one, two, atol=1e-5) and torch.allclose(one.norm(dim=1), torch.ones(4))


def test_fused_head_loss_and_hidden_gradient_equal_autograd_through_full_logits(lora_model: tuple) -> None:
    model, tokenizer, pad_id = lora_model
    head = output_head(model)
    assert head is not None  # the tiny Llama takes the fused path
    batch = [data.encode(tokenizer, "## Question\nWhat is 3*4?\n\n## Solution\n", "3*4=12", 64),
             data.encode(tokenizer, "", "Let $x^2 = 4$, so $x = \\pm 2$ and no other real root exists.", 64)]
    ids, targets = data.collate(batch, pad_id)  # prompt positions and right padding carry no loss
    with torch.no_grad():
        hidden = head.decoder(input_ids=ids, use_cache=False).last_hidden_state
    hidden64, weight64 = hidden.double().requires_grad_(), head.weight.detach().double()
    reference = per_example_loss(hidden64 @ weight64.T, targets)
    (expected_grad,) = torch.autograd.grad(reference.sum(), hidden64)
    for chunk in (3, 512):  # chunking over target positions does not change the result
        loss, grad = hidden_state_loss_grad(hidden64.detach(), weight64, targets, token_chunk=chunk)
        assert torch.allclose(loss, reference.detach(), atol=1e-10)
        assert torch.allclose(grad, expected_grad, atol=1e-12)
    assert expected_grad[targets == data.IGNORE].abs().max() == 0


def test_projection_buffer_size_does_not_change_features(lora_model: tuple) -> None:
    model, tokenizer, pad_id = lora_model
    texts = [f"Problem {i}: if $a = {i}$ then $a^2 = {i * i}$ and $2a = {2 * i}$." for i in range(7)]
    batch = [data.encode(tokenizer, "", t, 48) for t in texts]
    projector = RademacherProjector(sum(p.numel() for _, p in trainable_parameters(model)), 64, seed=3)
    per_chunk = gradient_features(model, batch, projector=projector, pad_id=pad_id, chunk_size=2, project_bytes=0)
    buffered = gradient_features(model, batch, projector=projector, pad_id=pad_id, chunk_size=2)
    assert torch.allclose(per_chunk, buffered, atol=1e-6)


def test_a_candidate_identical_to_a_target_example_ranks_first(lora_model: tuple, tmp_path: Path) -> None:
    """Real warm-up (AdamW moments), real per-example gradients, LESS similarities: the copy of a
    target beats candidates in the very same format (other benchmark items, same subjects)."""
    import copy

    from models.influence.warmup import load_checkpoint, warmup_train

    model, tokenizer, pad_id = lora_model
    model = copy.deepcopy(model)  # warm-up trains it: keep the module's model as it was
    settings = make_settings(tmp_path)
    config = InfluenceSettings.model_validate({**settings.influence.model_dump(), "targets_per_subtask": 2,
                                               "max_seq_len": 128})
    encode = lambda p, c: data.encode(tokenizer, p, c, config.max_seq_len)  # noqa: E731
    targets = data.load_targets(settings, config, fits=lambda t: encode(t.prompt, t.completion).n_loss_tokens > 0)
    copied = next(t for t in targets if t.subtask == "math/Algebra")
    wider = InfluenceSettings.model_validate({**config.model_dump(), "targets_per_subtask": 4})
    others = [t for t in data.load_targets(settings, wider) if t not in targets][::2]
    candidates = [encode(t.prompt, t.completion) for t in [*others, copied]]
    warm = data.warmup_subset(range(len(candidates)), config.warmup_fraction, config.warmup_min_examples, config.seed)
    checkpoints = warmup_train(model, [candidates[i] for i in warm], config, tmp_path / "checkpoints", pad_id, "cpu")
    projector = RademacherProjector(sum(p.numel() for _, p in trainable_parameters(model)), 1024, seed=0)
    target_features, candidate_features = [], []
    for info in checkpoints:
        moments = load_checkpoint(model, tmp_path / "checkpoints" / info.name, config)
        target_features.append(gradient_features(model, [encode(t.prompt, t.completion) for t in targets],
                                                 projector=projector, pad_id=pad_id, chunk_size=8))
        candidate_features.append(gradient_features(model, candidates, projector=projector, pad_id=pad_id,
                                                    chunk_size=8, moments=moments))
    weights = scoring.checkpoint_weights([c.mean_lr for c in checkpoints])
    similarity = scoring.weighted_similarity(candidate_features, target_features, weights)
    _, per_subtask = scoring.subtask_scores(similarity, len(subtasks := data.subtask_names(targets)))
    copy_index = len(others)
    assert len(others) >= 8
    # First on the target it copies, and on that target's subtask score. (Not necessarily overall:
    # Adam's momentum term is shared by every candidate's feature, so a candidate can score higher
    # on another subtask; the end-to-end test checks the overall rank on a smaller pool.)
    assert int(similarity[:, targets.index(copied)].argmax()) == copy_index, similarity[:, targets.index(copied)]
    assert int(per_subtask[:, subtasks.index(copied.subtask)].argmax()) == copy_index, per_subtask.tolist()


def test_scores_weight_checkpoints_average_subtasks_and_take_the_max() -> None:
    assert scoring.checkpoint_weights([2e-5, 1e-5, 1e-5]) == pytest.approx([0.5, 0.25, 0.25])
    c1, c2 = torch.eye(2), torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    t = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])  # subtasks A=(0,1), B=(2,3)
    sim = scoring.weighted_similarity([c1, c2], [t, t], [0.75, 0.25])
    expected = 0.75 * (c1 @ t.T) + 0.25 * (c2 @ t.T)
    assert torch.allclose(sim, expected)
    score, per_subtask = scoring.subtask_scores(sim, 2)
    assert torch.allclose(per_subtask, expected.reshape(2, 2, 2).mean(-1))
    assert torch.allclose(score, per_subtask.max(-1).values)
    with pytest.raises(ValueError, match="equal subtasks"):
        scoring.subtask_scores(sim, 3)



def test_selection_sizes_and_reproducible_ties() -> None:
    scores = {"d": 0.5, "a": 0.9, "c": 0.5, "b": 0.1}
    assert scoring.select(scores, top_k=3) == [("a", 0.9), ("c", 0.5), ("d", 0.5)]
    assert scoring.selection_size(1000, None, 0.05) == 50 and scoring.selection_size(10, None, 0.05) == 1
    assert scoring.selection_size(7, 10, None) == 7
    with pytest.raises(ValueError, match="either"):
        scoring.selection_size(10, 1, 0.5)


def test_targets_have_equal_counts_per_subtask_in_subtask_order(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    config = InfluenceSettings.model_validate({**settings.influence.model_dump(), "targets_per_subtask": 3})
    targets = data.load_targets(settings, config)
    subtasks = data.subtask_names(targets)
    assert subtasks[0] == "gsm8k" and len(subtasks) == 8  # GSM8K + the 7 MATH subjects
    assert [t.subtask for t in targets] == [s for s in subtasks for _ in range(3)]
    assert all(t.prompt.startswith("## Question\n") and t.prompt.endswith("## Solution\n") for t in targets)
    assert targets == data.load_targets(settings, config)  # seeded
    # Examples that do not fit (the job: prompt fills max_seq_len) are excluded before the draw.
    short = data.load_targets(settings, config, fits=lambda t: len(t.prompt) < 300)
    assert [t.subtask for t in short] == [t.subtask for t in targets] and all(len(t.prompt) < 300 for t in short)
    assert any(len(t.prompt) >= 300 for t in targets)
    with pytest.raises(ValueError, match=r"usable examples.*max_seq_len"):
        data.load_targets(settings, config, fits=lambda t: t.subtask != "gsm8k")
    too_many = InfluenceSettings.model_validate({**config.model_dump(), "targets_per_subtask": 10_000})
    with pytest.raises(ValueError, match="fewer than targets_per_subtask"):
        data.load_targets(settings, too_many)


def test_excerpt_candidates_and_pairs_attribute_to_source_docs() -> None:
    import json

    lines = (SAMPLE / "raw_corpus/stackmathqa/stackmathqa100k_partial.head300.jsonl").read_text().splitlines()[:5]
    rows = [{"doc_id": f"d{i}", "source": "s", "text": json.loads(x)["Q"] + "\n\n" + json.loads(x)["A"]}
            for i, x in enumerate(lines)] + [{"doc_id": "blank", "source": "s", "text": "  "}]
    documents, skipped = data.documents_from_corpus(rows, 300)
    assert skipped == {"empty_text": 1} and len(documents) == 5
    for doc in documents:
        text = next(r["text"] for r in rows if r["doc_id"] == doc["doc_id"])
        assert len(doc["excerpt"]) <= 300 and text[doc["excerpt_start"]:doc["excerpt_end"]] == doc["excerpt"]
    units = data.excerpt_units(documents)
    assert [u.prompt for u in units] == [""] * 5
    pairs, pair_skips = data.pair_units(
        [{"doc_id": "d1", "prompt": "p", "completion": "## Question\nq\n\n## Solution\ns"},
         {"doc_id": "d1", "prompt": "p2", "completion": "c2"}, {"doc_id": "zz", "prompt": "p", "completion": "c"},
         {"doc_id": "d2", "prompt": "p", "completion": ""}],
        {"doc_id": "doc_id", "prompt": "prompt", "completion": "completion"}, {d["doc_id"] for d in documents})
    assert [u.unit_id for u in pairs] == ["d1#0", "d1#1"]
    assert pair_skips == {"pair_doc_not_in_corpus": 1, "pair_missing_fields": 1}
    assert data.shard_documents(["c", "a", "b"], 0, 2) == {"a", "c"}
    assert math.isclose(len(data.warmup_subset(list(range(200)), 0.05, 8, seed=1)), 10)
