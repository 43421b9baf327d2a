"""Per-example gradient features of the LoRA parameters, computed in batches.

Three exact ways to get the (n × P) matrix of per-example gradients, P = number of LoRA weights:

* ``factored`` (default): one batched forward and one ``torch.autograd.grad`` of Σ_i loss_i with
  respect to every LoRA ``B`` output, then per example, for each LoRA layer ``y += s·B(A(x))``::

      ∂loss_i/∂B = Σ_t δ_it h_itᵀ            ∂loss_i/∂A = Σ_t (Bᵀ δ_it) x_itᵀ

  with δ = ∂/∂(B output), h = A's output, x = A's input (Goodfellow's per-example trick). Exact
  because examples never interact (causal attention within a row, per-token norms), so the
  gradient of the sum at example i's positions is example i's own gradient.
* ``vmap``: ``torch.func.vmap(grad(loss))`` over ``functional_call`` — generic (any trainable
  parameters), same numbers; attention runs through a plain causal kernel with batching rules.
* ``loop``: the LESS reference — batch size 1, one backward per example (benchmark baseline).

Loss per example: mean token cross-entropy over its completion tokens (the Hugging Face loss
LESS uses at batch size 1). Rows are right-padded without an attention mask (see
``data.collate``). Memory is bounded by ``chunk_size`` examples per batched call.

Candidates are Adam-preconditioned with the checkpoint's moments (no bias correction, as LESS):
m' = β1·m + (1−β1)·g, v' = β2·v + (1−β2)·g², Γ = m' / √(v' + ε). Targets keep plain gradients.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from models.influence.data import IGNORE, Encoded, collate

Method = Literal["factored", "vmap", "loop"]
VMAP_ATTENTION = "jzlake_vmap_causal"


def trainable_parameters(model: Any) -> list[tuple[str, Any]]:
    """The LoRA parameters in a fixed order (``named_parameters`` order): the feature layout."""
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def per_example_loss(logits: Any, targets: Any) -> Any:
    """Mean cross-entropy over each row's non-ignored targets → shape (rows,)."""
    import torch.nn.functional as F

    mask = targets != IGNORE
    token_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.clamp(min=0).reshape(-1),
                                 reduction="none").view_as(targets)
    return (token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1)


# ---- factored (hooks on the LoRA layers) ---------------------------------------------------------

@dataclass
class _LoraLayer:
    a_name: str
    b_name: str
    module: Any
    adapter: str


def lora_layers(model: Any) -> list[_LoraLayer] | None:
    """The LoRA Linear layers whose A/B weights are exactly the trainable parameters, else ``None``
    (DoRA, biases, modules_to_save…: use ``vmap``)."""
    from peft.tuners.lora import Linear as LoraLinear

    layers = []
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear) and not module.merged:
            for adapter in module.active_adapters:
                if adapter in module.lora_variant or module.lora_B[adapter].bias is not None:
                    return None
                layers.append(_LoraLayer(f"{name}.lora_A.{adapter}.weight", f"{name}.lora_B.{adapter}.weight",
                                         module, adapter))
    covered = {n for layer in layers for n in (layer.a_name, layer.b_name)}
    trainable = {n for n, _ in trainable_parameters(model)}
    return layers if layers and covered == trainable else None


def grads_factored(model: Any, input_ids: Any, targets: Any, layers: Sequence[_LoraLayer],
                   order: Sequence[str]) -> Any:
    """(rows × P) per-example gradients from one batched forward/backward (see module doc)."""
    import torch

    captured: dict[int, dict[str, Any]] = {i: {} for i in range(len(layers))}
    handles = []
    for i, layer in enumerate(layers):
        lora_a, lora_b = layer.module.lora_A[layer.adapter], layer.module.lora_B[layer.adapter]
        handles.append(lora_a.register_forward_hook(
            lambda _m, inputs, output, i=i: captured[i].update(x=inputs[0], h=output)))
        handles.append(lora_b.register_forward_hook(lambda _m, _in, output, i=i: captured[i].update(z=output)))
    try:
        logits = model(input_ids=input_ids, use_cache=False).logits
        loss = per_example_loss(logits, targets).sum()
        deltas = torch.autograd.grad(loss, [captured[i]["z"] for i in range(len(layers))])
    finally:
        for handle in handles:
            handle.remove()
    parts: dict[str, Any] = {}
    for i, (layer, delta) in enumerate(zip(layers, deltas, strict=True)):
        x, h = captured[i]["x"].detach(), captured[i]["h"].detach()
        weight_b = layer.module.lora_B[layer.adapter].weight.detach()
        parts[layer.b_name] = torch.einsum("blo,blr->bor", delta, h)
        parts[layer.a_name] = torch.einsum("blr,bli->bri", delta @ weight_b, x)
    return torch.cat([parts[name].reshape(input_ids.shape[0], -1) for name in order], dim=1)


# ---- vmap (torch.func) --------------------------------------------------------------------------

def _causal_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any,
                      scaling: float | None = None, dropout: float = 0.0, **_: Any) -> tuple[Any, None]:
    """Plain causal attention built from ops that have vmap batching rules (CPU SDPA has none)."""
    import torch

    repeats = query.shape[1] // key.shape[1]
    if repeats > 1:  # grouped-query attention: same layout as transformers' repeat_kv
        key, value = key.repeat_interleave(repeats, dim=1), value.repeat_interleave(repeats, dim=1)
    scores = torch.matmul(query, key.transpose(-1, -2)) * (scaling or query.shape[-1] ** -0.5)
    q_len, k_len = scores.shape[-2:]
    causal = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(diagonal=k_len - q_len)
    probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def vmap_attention(model: Any) -> Iterator[None]:
    """Route the model's attention through ``_causal_attention`` for the duration."""
    from transformers import AttentionInterface

    AttentionInterface.register(VMAP_ATTENTION, _causal_attention)
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = VMAP_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = previous


def grads_vmap(model: Any, input_ids: Any, targets: Any, order: Sequence[str]) -> Any:
    """(rows × P) per-example gradients with ``vmap(grad(loss))`` over ``functional_call``."""
    import torch
    from torch.func import functional_call, grad, vmap

    params = {name: p.detach() for name, p in trainable_parameters(model)}

    def loss_one(p: dict[str, Any], ids: Any, tgt: Any) -> Any:
        logits = functional_call(model, p, (ids.unsqueeze(0),), {"use_cache": False}).logits
        return per_example_loss(logits, tgt.unsqueeze(0))[0]

    with vmap_attention(model):
        grads = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, input_ids, targets)
    return torch.cat([grads[name].reshape(input_ids.shape[0], -1) for name in order], dim=1)


# ---- loop (LESS reference) ----------------------------------------------------------------------

def grads_loop(model: Any, batch: Sequence[Encoded], order: Sequence[str]) -> Any:
    """One forward/backward per example at batch size 1 (how LESS collects gradients)."""
    import torch

    params = dict(trainable_parameters(model))
    rows = []
    device = next(iter(params.values())).device
    for example in batch:
        ids = torch.tensor([example.input_ids], device=device)
        tgt = torch.tensor([example.targets], device=device)
        model.zero_grad(set_to_none=True)
        per_example_loss(model(input_ids=ids, use_cache=False).logits, tgt)[0].backward()
        rows.append(torch.cat([params[name].grad.reshape(-1) for name in order]))
    model.zero_grad(set_to_none=True)
    return torch.stack(rows)


# ---- features -----------------------------------------------------------------------------------

def adam_precondition(grads: Any, exp_avg: Any, exp_avg_sq: Any, beta1: float, beta2: float,
                      eps: float) -> Any:
    """LESS's Adam update direction for per-example gradients (no bias correction)."""
    m = beta1 * exp_avg + (1 - beta1) * grads
    v = beta2 * exp_avg_sq + (1 - beta2) * grads.square()
    return m / (v + eps).sqrt()


@dataclass
class Moments:
    """Adam state of one checkpoint, flattened in the feature layout."""

    exp_avg: Any
    exp_avg_sq: Any
    beta1: float
    beta2: float
    eps: float


def per_example_gradients(model: Any, batch: Sequence[Encoded], pad_id: int, method: Method = "factored"
                          ) -> Any:
    """(len(batch) × P) per-example gradients by ``method`` (one chunk; caller bounds its size)."""
    order = [name for name, _ in trainable_parameters(model)]
    if method == "loop":
        return grads_loop(model, batch, order)
    device = next(model.parameters()).device
    ids, targets = (t.to(device) for t in collate(batch, pad_id))
    if method == "factored":
        layers = lora_layers(model)
        if layers is not None:
            return grads_factored(model, ids, targets, layers, order)
        method = "vmap"  # not plain LoRA: the generic path gives the same numbers
    if method == "vmap":
        return grads_vmap(model, ids, targets, order)
    raise ValueError(f"unknown gradient method {method!r}; use factored, vmap or loop")


def gradient_features(model: Any, examples: Sequence[Encoded], *, projector: Any, pad_id: int,
                      chunk_size: int, method: Method = "factored", moments: Moments | None = None) -> Any:
    """L2-normalised projected features (n × d), in the order of ``examples``.

    Examples are processed in chunks of similar length (sorted by length: little padding), each
    chunk's gradients preconditioned (``moments`` given: candidates) and projected at once.
    """
    import torch

    was_training = model.training
    model.eval()  # dropout off: features are deterministic
    order = sorted(range(len(examples)), key=lambda i: (len(examples[i].input_ids), i))
    out = torch.empty(len(examples), projector.dim, dtype=projector.dtype, device=projector.device)
    try:
        for lo in range(0, len(order), max(1, chunk_size)):
            index = order[lo: lo + chunk_size]
            grads = per_example_gradients(model, [examples[i] for i in index], pad_id, method)
            with torch.no_grad():
                if moments is not None:
                    grads = adam_precondition(grads, moments.exp_avg, moments.exp_avg_sq,
                                              moments.beta1, moments.beta2, moments.eps)
                out[torch.tensor(index, device=out.device)] = projector.project(grads.detach())
    finally:
        model.train(was_training)
    return torch.nn.functional.normalize(out, dim=1)
