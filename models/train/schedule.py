"""The WSD (warm-up, stable, decay) learning-rate schedule of JiuZhang3.0.

Over ``total`` optimizer steps with peak learning rate ``peak``, the factor at step ``s`` is

* ``s / W`` for ``s < W`` (linear warm-up from 0; ``W = ceil(warmup_ratio · total)``),
* ``1`` for ``W ≤ s < D`` (stable; ``D = floor(decay_start · total)``),
* ``1 − (1 − min_ratio) · (s − D) / (total − D)`` for ``D ≤ s ≤ total`` (linear decay to
  ``min_ratio`` at ``s = total``).

``LambdaLR`` evaluates the factor at the index of the step about to be taken, so the first
update uses factor 0 (as ``transformers``' linear warm-up does) and the scheduler's lr after
the last step is ``min_ratio · peak``.
"""

from __future__ import annotations

import math
from typing import Any


def wsd_boundaries(total: int, warmup_ratio: float, decay_start: float) -> tuple[int, int]:
    """``(W, D)``: the first step at full lr and the first step of the decay."""
    if total < 1:
        raise ValueError(f"a schedule needs at least one step, got {total}")
    if not 0 <= warmup_ratio <= decay_start <= 1:
        raise ValueError(f"need 0 ≤ warmup_ratio ({warmup_ratio}) ≤ decay_start ({decay_start}) ≤ 1")
    warmup = math.ceil(warmup_ratio * total)
    decay = max(warmup, math.floor(decay_start * total))
    return warmup, decay


def wsd_factor(step: int, total: int, warmup_ratio: float = 0.03, decay_start: float = 0.85,
               min_ratio: float = 0.1) -> float:
    """The lr multiplier at optimizer step ``step`` (0 … total); see the module docstring."""
    warmup, decay = wsd_boundaries(total, warmup_ratio, decay_start)
    step = min(max(step, 0), total)
    if step < warmup:
        return step / warmup
    if step < decay or total == decay:
        return 1.0
    return 1.0 - (1.0 - min_ratio) * (step - decay) / (total - decay)


def wsd_scheduler(optimizer: Any, total: int, warmup_ratio: float, decay_start: float, min_ratio: float) -> Any:
    """A ``torch.optim.lr_scheduler.LambdaLR`` following ``wsd_factor`` (state_dict-resumable)."""
    from functools import partial

    import torch

    wsd_boundaries(total, warmup_ratio, decay_start)  # fail before any step on a bad configuration
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(wsd_factor, total=total, warmup_ratio=warmup_ratio, decay_start=decay_start,
                           min_ratio=min_ratio))
