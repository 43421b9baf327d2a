"""Seeded Rademacher random projection (TRAK/LESS), generated blockwise.

The projection matrix R ∈ {±1/√d}^{P×d} is never needed as a whole: rows are generated in
blocks of ``block_rows`` parameters, each from its own generator seeded by (seed, block index),
so any process on any device reproduces exactly the same R — candidates and targets are
projected identically, shard after shard. ``G @ R`` is accumulated block by block. Generated
blocks are kept only while they fit ``cache_bytes`` (a tiny model's R fits; a 7B LoRA's does not
and is regenerated per call, which is why callers project large chunks at once).

Signs come from random bytes unpacked into bits: 8 signs per drawn byte. They are generated
on the CPU (bit-identical everywhere) and moved to the compute device.
"""

from __future__ import annotations

import math
from typing import Any


def _block_seed(seed: int, block: int) -> int:
    # SplitMix-style mixing keeps neighbouring (seed, block) pairs far apart in the generator space.
    x = (seed * 0x9E3779B97F4A7C15 + block * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) % (1 << 64)
    x ^= x >> 31
    return x % (1 << 63)


class RademacherProjector:
    """``project(G)``: (n × P) → (n × d) with a fixed seeded ±1/√d matrix."""

    def __init__(self, num_params: int, dim: int, seed: int, *, block_rows: int = 4096,
                 cache_bytes: int = 512 << 20, dtype: Any = None, device: Any = None) -> None:
        import torch

        if num_params <= 0 or dim <= 0:
            raise ValueError(f"projection needs positive sizes, got P={num_params}, d={dim}")
        self.num_params, self.dim, self.seed = num_params, dim, seed
        self.block_rows = max(1, block_rows)
        self.dtype = dtype or torch.float32
        self.device = torch.device(device or "cpu")
        self.num_blocks = math.ceil(num_params / self.block_rows)
        bytes_per_block = self.block_rows * dim * torch.empty((), dtype=self.dtype).element_size()
        self._cache_limit = max(0, cache_bytes // max(1, bytes_per_block))
        self._cache: dict[int, Any] = {}
        self._bit_shifts = torch.arange(8, dtype=torch.uint8)

    def block(self, index: int) -> Any:
        """Rows ``[index·block_rows, …)`` of R, shape (rows, d)."""
        import torch

        if index in self._cache:
            return self._cache[index]
        rows = min(self.block_rows, self.num_params - index * self.block_rows)
        generator = torch.Generator(device="cpu").manual_seed(_block_seed(self.seed, index))
        packed = torch.randint(0, 256, (rows, math.ceil(self.dim / 8)), dtype=torch.uint8, generator=generator)
        bits = (packed.unsqueeze(-1) >> self._bit_shifts) & 1
        signs = bits.reshape(rows, -1)[:, : self.dim].to(self.dtype).mul_(2).sub_(1)
        matrix = signs.mul_(1.0 / math.sqrt(self.dim)).to(self.device)
        if len(self._cache) < self._cache_limit:
            self._cache[index] = matrix
        return matrix

    def project(self, grads: Any) -> Any:
        """``grads @ R`` for a (n × P) matrix, accumulated block by block."""
        import torch

        if grads.shape[-1] != self.num_params:
            raise ValueError(f"gradient width {grads.shape[-1]} != projector's {self.num_params} parameters")
        grads = grads.to(device=self.device, dtype=self.dtype)
        out = torch.zeros(grads.shape[0], self.dim, dtype=self.dtype, device=self.device)
        for index in range(self.num_blocks):
            lo = index * self.block_rows
            out.addmm_(grads[:, lo: lo + self.block_rows], self.block(index))
        return out
