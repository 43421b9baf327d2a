"""LESS warm-up: LoRA on a small random sample of the candidates, one checkpoint per epoch.

Each checkpoint holds the LoRA weights and AdamW's first/second moments *by parameter name*
(optimizer state is indexed by position; names survive any reordering) plus the epoch's mean
learning rate, which weights the checkpoint in the score. AdamW with a linear warm-up/decay
schedule (Hugging Face ``get_linear_schedule_with_warmup`` shape), no weight decay, as LESS.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from jzlake.settings import InfluenceSettings
from models.influence.data import IGNORE, Encoded, collate
from models.influence.gradients import Moments, trainable_parameters

ADAPTER_FILE = "adapter.safetensors"
MOMENTS_FILE = "adam_moments.safetensors"
META_FILE = "checkpoint.json"


@dataclass(frozen=True)
class CheckpointInfo:
    name: str
    epoch: int
    mean_lr: float
    steps: int
    mean_loss: float


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def attach_lora(model: Any, config: InfluenceSettings, seed: int) -> Any:
    """Wrap ``model`` with a fresh LoRA adapter (A initialised from ``seed``, B = 0)."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=list(config.lora_target_modules), task_type="CAUSAL_LM", bias="none")
    model = get_peft_model(model, lora)
    model.eval()  # new LoRA dropout modules start in training mode; warm-up switches to train itself
    return model


def linear_schedule(total_steps: int, warmup_ratio: float) -> Any:
    """LR multiplier per step: linear warm-up over ceil(ratio·total) steps, then linear decay to 0."""
    warmup = math.ceil(warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup  # step 0 already trains (HF starts at 0; LESS's first step is tiny)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return factor


def _batch_loss(model: Any, batch: Sequence[Encoded], pad_id: int, device: str) -> Any:
    """Token-level mean cross-entropy over the batch's completion tokens (HF Trainer's loss)."""
    import torch.nn.functional as F

    ids, targets = (t.to(device) for t in collate(batch, pad_id))
    logits = model(input_ids=ids, use_cache=False).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE)


def save_checkpoint(model: Any, optimizer: Any, directory: Path, info: CheckpointInfo) -> None:
    """LoRA weights, Adam moments (by name) and the checkpoint's metadata."""
    import torch
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    params = trainable_parameters(model)
    save_file({name: p.detach().cpu().contiguous() for name, p in params}, str(directory / ADAPTER_FILE))
    moments = {}
    for name, p in params:
        state = optimizer.state.get(p, {})
        moments[f"exp_avg.{name}"] = state.get("exp_avg", torch.zeros_like(p)).detach().cpu().contiguous()
        moments[f"exp_avg_sq.{name}"] = state.get("exp_avg_sq", torch.zeros_like(p)).detach().cpu().contiguous()
    save_file(moments, str(directory / MOMENTS_FILE))
    (directory / META_FILE).write_text(json.dumps(asdict(info), indent=2, sort_keys=True))


def load_checkpoint(model: Any, directory: Path, config: InfluenceSettings, dtype: Any = None) -> Moments:
    """Load the checkpoint's LoRA weights into ``model``; return its flattened Adam moments."""
    import torch
    from safetensors.torch import load_file

    weights = load_file(str(directory / ADAPTER_FILE))
    moments = load_file(str(directory / MOMENTS_FILE))
    params = trainable_parameters(model)
    missing = [name for name, _ in params if name not in weights]
    if missing:
        raise ValueError(f"checkpoint {directory} lacks LoRA weights {missing[:3]}…: it was written for another "
                         "model or LoRA configuration; rerun the prepare step")
    with torch.no_grad():
        for name, p in params:
            p.copy_(weights[name].to(p.dtype))
    device = params[0][1].device
    dtype = dtype or params[0][1].dtype
    exp_avg = torch.cat([moments[f"exp_avg.{n}"].reshape(-1) for n, _ in params]).to(device, dtype)
    exp_avg_sq = torch.cat([moments[f"exp_avg_sq.{n}"].reshape(-1) for n, _ in params]).to(device, dtype)
    return Moments(exp_avg, exp_avg_sq, config.adam_beta1, config.adam_beta2, config.adam_eps)


def read_checkpoint_info(directory: Path) -> CheckpointInfo:
    return CheckpointInfo(**json.loads((directory / META_FILE).read_text()))


def warmup_train(model: Any, examples: Sequence[Encoded], config: InfluenceSettings, out_dir: Path,
                 pad_id: int, device: str) -> list[CheckpointInfo]:
    """Train the LoRA ``model`` for ``warmup_epochs`` epochs; save ``epoch-<k>`` checkpoints."""
    import torch

    if not examples:
        raise ValueError("the warm-up sample is empty: the candidate pool has no usable examples")
    params = [p for _, p in trainable_parameters(model)]
    optimizer = torch.optim.AdamW(params, lr=config.warmup_lr, betas=(config.adam_beta1, config.adam_beta2),
                                  eps=config.adam_eps, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(examples) / config.warmup_batch_size)
    total = steps_per_epoch * config.warmup_epochs
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(total, config.warmup_ratio))
    order_rng = random.Random(config.seed)
    checkpoints = []
    model.train()
    for epoch in range(1, config.warmup_epochs + 1):
        order = list(range(len(examples)))
        order_rng.shuffle(order)
        lrs, losses = [], []
        for lo in range(0, len(order), config.warmup_batch_size):
            batch = [examples[i] for i in order[lo: lo + config.warmup_batch_size]]
            lrs.append(optimizer.param_groups[0]["lr"])
            loss = _batch_loss(model, batch, pad_id, device)
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        info = CheckpointInfo(name=f"epoch-{epoch}", epoch=epoch, mean_lr=sum(lrs) / len(lrs),
                              steps=epoch * steps_per_epoch, mean_loss=sum(losses) / len(losses))
        save_checkpoint(model, optimizer, out_dir / info.name, info)
        checkpoints.append(info)
    model.eval()
    return checkpoints
