"""The tiny local model: a BPE tokenizer and a 2-layer Llama, built deterministically from the sample.

No model hub is reachable from CI machines, so tests and the demo use a model we build ourselves:

* a byte-level BPE tokenizer (``tokenizers``) trained on the embedded sample corpus and the
  benchmark questions/solutions, saved as a ``PreTrainedTokenizerFast`` with special tokens and a
  Jinja chat template (system/user/assistant, ``add_generation_prompt``) in ``tokenizer_config.json``;
* a tiny ``LlamaForCausalLM`` initialised from a fixed seed, then briefly trained (a few hundred
  steps of next-token prediction on the same text, single-threaded so the bytes do not depend on
  the machine's core count) so that generations are not pure noise;

saved with ``save_pretrained`` (safetensors) so ``AutoModelForCausalLM.from_pretrained(dir)`` and
``transformers serve <dir>`` load it. The build reads the sample JSONL files directly (it does not
depend on the lake) and is skipped when the directory already carries a completion marker for the
same recipe. Build: ``python -m models.tiny [--out DIR] [--force]``.
"""

from __future__ import annotations

import argparse
import hashlib
import html
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jzlake.settings import Settings

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample"
MARKER = ".jzlake-complete.json"

BOS, EOS, PAD, UNK = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>", "<|unk|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
SPECIAL_TOKENS = (BOS, EOS, PAD, UNK, *ROLE_TOKENS)

# Every turn is "<|role|>\n{content}<|end|>\n"; the assistant's turn also ends the sequence.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] | trim + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


@dataclass(frozen=True)
class TinyRecipe:
    """Everything that determines the built bytes; its hash is the completion marker's key."""

    version: int = 1
    seed: int = 1234
    vocab_size: int = 6000
    min_frequency: int = 2
    hidden_size: int = 96
    intermediate_size: int = 256
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    max_positions: int = 2048
    train_steps: int = 200
    train_seq_len: int = 128
    train_batch: int = 8
    learning_rate: float = 1e-2

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


# ---- corpus -------------------------------------------------------------------------------------

_TAG = re.compile(r"<[^>]{1,200}>")


def _strings(value: Any) -> Iterator[str]:
    """Every string leaf of a JSON value, in document order."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def _plain(text: str) -> str:
    # Tokenizer training only: drop HTML tags so "<p>" does not become a merge, keep LaTeX as is.
    if "</" in text:
        text = html.unescape(_TAG.sub(" ", text))
    return text.strip()


def sample_texts(sample_dir: Path = SAMPLE, min_chars: int = 40) -> list[str]:
    """Text of the embedded sample (raw corpus + benchmark questions and solutions), fixed order."""
    texts: list[str] = []
    for path in sorted((sample_dir / "raw_corpus").rglob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                texts.extend(t for t in map(_plain, _strings(json.loads(line))) if len(t) >= min_chars)
    for path in sorted((sample_dir / "benchmarks").rglob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            question = row.get("question") or row.get("problem") or ""
            solution = row.get("answer") if "question" in row else row.get("solution", "")
            texts.append(f"## Question\n{question}\n\n## Solution\n{solution}".strip())
    if not texts:
        raise FileNotFoundError(f"no sample text under {sample_dir}: the tiny model is trained on "
                                "data/sample/raw_corpus and data/sample/benchmarks; restore them")
    return texts


# ---- tokenizer ----------------------------------------------------------------------------------

def train_tokenizer(texts: Sequence[str], recipe: TinyRecipe) -> Any:
    """Byte-level BPE trained on ``texts``, wrapped as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=recipe.vocab_size, min_frequency=recipe.min_frequency,
        special_tokens=list(SPECIAL_TOKENS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        model_max_length=recipe.max_positions, chat_template=CHAT_TEMPLATE,
        extra_special_tokens={"system_token": "<|system|>", "user_token": "<|user|>",
                              "assistant_token": "<|assistant|>", "end_turn_token": "<|end|>"},
    )
    fast.padding_side = "right"
    return fast


# ---- model --------------------------------------------------------------------------------------

def build_model(tokenizer: Any, recipe: TinyRecipe) -> Any:
    """A freshly initialised tiny ``LlamaForCausalLM`` (seeded)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size, num_hidden_layers=recipe.num_layers,
        num_attention_heads=recipe.num_heads, num_key_value_heads=recipe.num_kv_heads,
        max_position_embeddings=recipe.max_positions, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=[tokenizer.eos_token_id,
                                                             tokenizer.convert_tokens_to_ids("<|end|>")],
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(recipe.seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id, do_sample=False, max_new_tokens=64,
    )
    return model


def _training_blocks(tokenizer: Any, texts: Sequence[str], seq_len: int) -> Any:
    import torch

    ids: list[int] = []
    # The Rust tokenizer directly: batched, and no per-text max-length warnings.
    for encoding in tokenizer.backend_tokenizer.encode_batch(list(texts), add_special_tokens=False):
        ids.extend(encoding.ids)
        ids.append(tokenizer.eos_token_id)
    usable = (len(ids) // seq_len) * seq_len
    return torch.tensor(ids[:usable], dtype=torch.long).view(-1, seq_len)


def train_briefly(model: Any, tokenizer: Any, texts: Sequence[str], recipe: TinyRecipe) -> float:
    """A few hundred LM steps on the sample; returns the last loss. Deterministic (seeded, 1 thread)."""
    import torch

    if recipe.train_steps <= 0:
        return float("nan")
    blocks = _training_blocks(tokenizer, texts, recipe.train_seq_len)
    generator = torch.Generator().manual_seed(recipe.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / 20) * max(0.05, 1 - step / recipe.train_steps))
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(recipe.train_steps):
        batch = blocks[torch.randint(len(blocks), (recipe.train_batch,), generator=generator)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    return float(loss.detach())


# ---- build --------------------------------------------------------------------------------------

def is_complete(directory: Path, recipe: TinyRecipe | None = None) -> bool:
    """True when ``directory`` holds a finished build of ``recipe`` (marker present and matching)."""
    marker = directory / MARKER
    if not marker.is_file():
        return False
    try:
        data = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return data.get("recipe_digest") == (recipe or TinyRecipe()).digest()


def weights_sha256(directory: Path) -> str:
    """SHA-256 of the saved safetensors weights (the determinism check compares these)."""
    digest = hashlib.sha256()
    for path in sorted(directory.glob("*.safetensors")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def build_tiny_model(out_dir: Path, recipe: TinyRecipe | None = None, sample_dir: Path = SAMPLE) -> dict:
    """Build tokenizer + model into ``out_dir`` (atomically: a temp sibling renamed into place)."""
    import torch

    recipe = recipe or TinyRecipe()
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    threads = torch.get_num_threads()
    # One thread: CPU float reductions then do not depend on the core count, so the bytes are
    # the same on every machine for a given torch build.
    torch.set_num_threads(1)
    try:
        texts = sample_texts(sample_dir)
        tokenizer = train_tokenizer(texts, recipe)
        model = build_model(tokenizer, recipe)
        last_loss = train_briefly(model, tokenizer, texts, recipe)
    finally:
        torch.set_num_threads(threads)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.save_pretrained(staging)
        # Chat template in tokenizer_config.json (not chat_template.jinja): every loader reads it.
        tokenizer.save_pretrained(staging, save_jinja_files=False)
        info = {
            "recipe": asdict(recipe), "recipe_digest": recipe.digest(),
            "weights_sha256": weights_sha256(staging), "vocab_size": len(tokenizer),
            "parameters": sum(p.numel() for p in model.parameters()),
            "train_texts": len(texts), "final_train_loss": last_loss,
            "build_seconds": round(time.perf_counter() - started, 2),
        }
        (staging / MARKER).write_text(json.dumps(info, indent=2, sort_keys=True))
        if out_dir.exists():
            shutil.rmtree(out_dir)  # stale or other-recipe build; only reached when incomplete
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return info


def ensure_model_dir(out_dir: Path, recipe: TinyRecipe | None = None, force: bool = False) -> Path:
    """Build into ``out_dir`` unless a complete build of the same recipe is already there.

    Concurrent callers (parallel test processes) serialise on a lock file next to the directory,
    so exactly one builds and the others find the completion marker.
    """
    import fcntl

    out_dir = Path(out_dir)
    if not force and is_complete(out_dir, recipe):
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(out_dir.parent / f".{out_dir.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if force or not is_complete(out_dir, recipe):
            build_tiny_model(out_dir, recipe)
    return out_dir


def ensure_tiny_model(settings: Settings, recipe: TinyRecipe | None = None) -> Path:
    """The tiny model's directory (``settings.models.tiny_model_dir``), built on first use."""
    return ensure_model_dir(Path(settings.path(settings.models.tiny_model_dir)), recipe)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.tiny", description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="output directory (default: settings.models.tiny_model_dir)")
    parser.add_argument("--config", help="YAML settings file")
    parser.add_argument("--force", action="store_true", help="rebuild even if a complete build exists")
    parser.add_argument("--train-steps", type=int, help="override the recipe's LM training steps")
    args = parser.parse_args(argv)
    from jzlake.settings import load_settings

    settings = load_settings(args.config)
    recipe = TinyRecipe() if args.train_steps is None else TinyRecipe(train_steps=args.train_steps)
    out = Path(args.out) if args.out else Path(settings.path(settings.models.tiny_model_dir))
    ensure_model_dir(out, recipe, force=args.force)
    info = json.loads((out / MARKER).read_text())
    print(json.dumps({"model_dir": str(out), **{k: info[k] for k in (
        "weights_sha256", "vocab_size", "parameters", "final_train_loss", "build_seconds")}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
