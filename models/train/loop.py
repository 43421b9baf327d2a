"""The training core shared by both jobs: one ``accelerate`` loop over a fixed list of steps.

The caller fixes the **data order** before training: ``steps`` is the full list of global
batches (rows, packed or not), computed deterministically from the pinned inputs and the seed.
Step ``k`` is therefore the same batch in every process and every attempt, which is what makes
a resumed run equal an uninterrupted one.

Per optimizer step: this process's rows (``rows[rank::world]``) in micro-batches, loss = summed
token cross-entropy on target tokens / target tokens of the whole global batch (so gradient
accumulation and the process count do not change the update), gradient clipping, AdamW, WSD
schedule (``models/train/schedule.py``).

**Checkpoints** every ``checkpoint_every`` steps and at the end: ``accelerator.save_state``
(model as safetensors, optimizer, scheduler, RNG states of every process) plus ``state.json``
(the data position = the next step, tokens, loss/lr curves), written to a temporary folder and
renamed, so a killed job finds either a whole checkpoint or none. On start the latest complete
checkpoint is loaded and training continues at its step. Multi-GPU: ``accelerate launch
--config_file infra/accelerate/fsdp.yaml -m models.train.<job> ...`` (FSDP); the CPU path is a
single process.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jzlake.settings import TrainRecipe
from models.train.data import IGNORE, Row, collate, micro_batches, packing_attention_mask
from models.train.schedule import wsd_scheduler

STATE_FILE = "state.json"
CHECKPOINT_PREFIX = "step-"


@dataclass
class TrainResult:
    """What one call of ``train`` did (curves cover every step, resumed ones included)."""

    total_steps: int
    steps_run: int = 0
    resumed_from_step: int | None = None
    tokens: int = 0                     # non-pad tokens of every step so far
    target_tokens: int = 0
    losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    seconds: float = 0.0
    finished: bool = False

    @property
    def loss_first(self) -> float | None:
        return self.losses[0] if self.losses else None

    @property
    def loss_last(self) -> float | None:
        return self.losses[-1] if self.losses else None


def resolve_device(device: str) -> str:
    """``auto`` → ``cuda`` when available, else ``cpu``."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def make_accelerator(device: str, precision: str) -> Any:
    from accelerate import Accelerator

    cpu = device == "cpu"
    return Accelerator(cpu=cpu, mixed_precision="bf16" if precision == "bf16" and not cpu else "no",
                       step_scheduler_with_optimizer=False)


def load_model(path: Path, recipe: TrainRecipe, seed: int) -> Any:
    """The base model (float32 master weights), with LoRA adapters when ``recipe.method == 'lora'``."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.config.use_cache = False
    if recipe.method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(
            r=recipe.lora_r, lora_alpha=recipe.lora_alpha, lora_dropout=recipe.lora_dropout,
            target_modules=list(recipe.lora_target_modules), task_type="CAUSAL_LM"))
    return model


def mergeable(model: Any) -> Any:
    """The plain ``transformers`` model to save: LoRA adapters merged into the base weights."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


# ---- checkpoints --------------------------------------------------------------------------------

def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoints (``state.json`` present), oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(CHECKPOINT_PREFIX) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.removeprefix(CHECKPOINT_PREFIX)))


def save_checkpoint(accelerator: Any, root: Path, step: int, result: TrainResult, keep: int) -> Path:
    """Accelerate state + ``state.json`` into ``root/step-NNNNNN`` (atomic rename), older ones pruned."""
    final = root / f"{CHECKPOINT_PREFIX}{step:06d}"
    staging = root / f".tmp-{CHECKPOINT_PREFIX}{step:06d}"
    if accelerator.is_main_process and staging.exists():
        shutil.rmtree(staging)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging), safe_serialization=True)
    if accelerator.is_main_process:
        state = {"next_step": step, "total_steps": result.total_steps, "tokens": result.tokens,
                 "target_tokens": result.target_tokens, "losses": result.losses, "lrs": result.lrs}
        (staging / STATE_FILE).write_text(json.dumps(state))
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        for old in checkpoint_dirs(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


# ---- the loop -----------------------------------------------------------------------------------

def _target_count(rows: Sequence[Row]) -> int:
    # labels[0] of a row is always IGNORE (first token of a sample), so this equals the shifted count
    return sum(sum(1 for label in row.labels[1:] if label != IGNORE) for row in rows)


def _micro_loss(model: Any, batch: dict[str, Any], explicit_mask: bool) -> Any:
    """Summed cross-entropy over the micro-batch's target tokens."""
    import torch

    labels = batch.pop("labels")
    if explicit_mask and "attention_mask" not in batch:
        batch["attention_mask"] = packing_attention_mask(batch["position_ids"], torch.float32)
    # use_cache=False: with a cache, transformers does not read restarting position ids as packing
    logits = model(**batch, use_cache=False).logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                             ignore_index=IGNORE, reduction="sum")


def train(model: Any, steps: Sequence[Sequence[Row]], recipe: TrainRecipe, *, pad_id: int, checkpoint_root: Path,
          device: str = "cpu", seed: int = 0, checkpoint_every: int = 50, keep_checkpoints: int = 2,
          stop_after_step: int | None = None, on_step: Callable[[int, float, float], None] | None = None,
          accelerator: Any = None) -> tuple[Any, TrainResult]:
    """Run (or resume) the steps; returns the prepared model (``accelerator.unwrap_model`` gives the
    module; on a single process it is the module itself) and what happened.

    ``stop_after_step``: return after that step (a checkpoint is written first) — how tests and
    ``--stop-after-step`` simulate a preempted job. ``on_step(step, loss, lr)`` sees every step.
    """
    import torch
    from tqdm import tqdm

    if not steps:
        raise ValueError("no training steps: the inputs produced no batch")
    started = time.perf_counter()
    accelerator = accelerator or make_accelerator(device, recipe.precision)
    torch.manual_seed(seed)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=recipe.learning_rate, weight_decay=recipe.weight_decay)
    scheduler = wsd_scheduler(optimizer, len(steps), recipe.warmup_ratio, recipe.decay_start, recipe.min_lr_ratio)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    result = TrainResult(total_steps=len(steps))
    start = 0
    existing = checkpoint_dirs(checkpoint_root)
    if existing:
        accelerator.load_state(str(existing[-1]))
        state = json.loads((existing[-1] / STATE_FILE).read_text())
        if state["total_steps"] != len(steps):
            raise RuntimeError(f"checkpoint {existing[-1]} belongs to a {state['total_steps']}-step run, this one "
                               f"has {len(steps)} steps; remove {checkpoint_root} to start over")
        start = result.resumed_from_step = state["next_step"]
        result.tokens, result.target_tokens = state["tokens"], state["target_tokens"]
        result.losses, result.lrs = list(state["losses"]), list(state["lrs"])

    rank, world = accelerator.process_index, accelerator.num_processes
    explicit_mask = recipe.packing and recipe.packing_mask == "explicit"
    model.train()
    bar = tqdm(total=len(steps), initial=start, desc="train", unit="step", file=sys.stderr,
               disable=not sys.stderr.isatty() or not accelerator.is_local_main_process)
    for step in range(start, len(steps)):
        rows = steps[step]
        n_targets = max(1, _target_count(rows))
        lr = scheduler.get_last_lr()[0]
        step_loss = torch.zeros((), device=accelerator.device)
        chunks = micro_batches(rows, recipe.micro_batch_size, rank, world)
        for i, chunk in enumerate(chunks):
            batch = {k: v.to(accelerator.device) for k, v in collate(chunk, pad_id, recipe.packing).items()}
            sync = i == len(chunks) - 1
            with accelerator.autocast(), (accelerator.no_sync(model) if not sync else contextlib.nullcontext()):
                loss_sum = _micro_loss(model, batch, explicit_mask)
                # DDP/FSDP average gradients over processes: scale so the step uses sum / global targets
                accelerator.backward(loss_sum * world / n_targets)
            step_loss += loss_sum.detach()
        if recipe.max_grad_norm:
            accelerator.clip_grad_norm_(model.parameters(), recipe.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss = float(accelerator.reduce(step_loss, reduction="sum")) / n_targets
        result.losses.append(loss)
        result.lrs.append(lr)
        result.tokens += sum(len(r) for r in rows)
        result.target_tokens += n_targets
        result.steps_run += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        if on_step is not None:
            on_step(step, loss, lr)
        done = step + 1
        if done == len(steps) or (checkpoint_every and done % checkpoint_every == 0) or done == stop_after_step:
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss is {loss} at step {step}: lower the learning rate")
            save_checkpoint(accelerator, checkpoint_root, done, result, keep_checkpoints)
        if done == stop_after_step and done < len(steps):
            break
    bar.close()
    result.finished = len(result.losses) == len(steps)
    result.seconds = time.perf_counter() - started
    model.eval()
    return model, result
