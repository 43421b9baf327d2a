"""The tiny local model builds, reloads through the Auto classes, chats, generates, and is deterministic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from models import tiny
from tests.conftest import make_settings


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # The shared cache under var/ (built once, reused by every later test and the demo).
    return tiny.ensure_tiny_model(make_settings(tmp_path_factory.mktemp("tiny")))


def test_build_reloads_and_generates(tiny_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert tiny.is_complete(tiny_dir)
    info = json.loads((tiny_dir / tiny.MARKER).read_text())
    assert 4000 <= info["vocab_size"] <= 8000
    assert info["weights_sha256"] == tiny.weights_sha256(tiny_dir)
    assert list(tiny_dir.glob("*.safetensors")), "weights must be saved as safetensors"
    config = json.loads((tiny_dir / "tokenizer_config.json").read_text())
    assert "add_generation_prompt" in config["chat_template"]

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert model.config.model_type == "llama"
    assert model.config.max_position_embeddings == 2048
    # Training moved the loss well below a uniform guess over the vocabulary (ln 6000 ≈ 8.7).
    assert info["final_train_loss"] < 7.0

    messages = [{"role": "system", "content": "You are a math teacher."},
                {"role": "user", "content": "What is $2+3$?"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.startswith(tokenizer.bos_token) and prompt.endswith("<|assistant|>\n")
    assert "<|system|>\nYou are a math teacher.<|end|>" in prompt
    without = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert not without.endswith("<|assistant|>\n")

    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    torch.manual_seed(0)
    out = model.generate(**inputs, max_new_tokens=12, do_sample=True, top_k=20)
    assert out.shape[1] > inputs["input_ids"].shape[1]
    assert isinstance(tokenizer.decode(out[0], skip_special_tokens=True), str)
    # Math text tokenises into sub-word pieces, not bytes: the BPE learned the sample's vocabulary.
    text = "Let $f(x) = x^2$ be a function; the derivative is $2x$."
    assert len(tokenizer(text)["input_ids"]) < len(text.encode()) / 2
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_rebuild_is_deterministic_and_skipped_when_complete(tmp_path: Path) -> None:
    recipe = tiny.TinyRecipe(train_steps=3)  # same code path as the default, fewer steps
    first = tiny.ensure_model_dir(tmp_path / "a", recipe)
    second = tiny.ensure_model_dir(tmp_path / "b", recipe)
    assert tiny.weights_sha256(first) == tiny.weights_sha256(second)
    assert (first / "tokenizer.json").read_bytes() == (second / "tokenizer.json").read_bytes()

    marker_mtime = (first / tiny.MARKER).stat().st_mtime_ns
    tiny.ensure_model_dir(first, recipe)  # complete: nothing rebuilt
    assert (first / tiny.MARKER).stat().st_mtime_ns == marker_mtime
    # A different recipe is not "complete" for this directory.
    assert not tiny.is_complete(first, tiny.TinyRecipe(train_steps=4))
