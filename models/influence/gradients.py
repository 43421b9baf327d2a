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


@dataclass
class _OutputHead:
    decoder: Any   # the transformer body: input_ids → final (normed) hidden states
    weight: Any    # the frozen LM head (vocab × hidden); logits = hidden @ weightᵀ


def output_head(model: Any) -> _OutputHead | None:
    """The body and frozen bias-free linear LM head of a plain causal LM, else ``None`` (soft-capped or
    scaled logits, a head with a bias or a LoRA: the autograd path through the full logits)."""
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    config = getattr(base, "config", None)
    plain = (type(head) is torch.nn.Linear and head.bias is None and not head.weight.requires_grad
             and decoder is not None and decoder is not base
             and not getattr(config, "final_logit_softcapping", None) and not hasattr(config, "logit_scale"))
    return _OutputHead(decoder, head.weight) if plain else None


def hidden_state_loss_grad(hidden: Any, weight: Any, targets: Any, token_chunk: int = 512) -> tuple[Any, Any]:
    """Per-row mean cross-entropy of ``hidden @ weightᵀ`` and its gradient w.r.t. ``hidden``, fused.

    For Σ_i loss_i with loss_i = mean over row i's target tokens of CE, the gradient at a target
    position t of row i is ``(softmax(z_t) − onehot(y_t)) / n_i · W``. Only target positions are
    computed (prompt and padding rows of the logits are never formed), ``token_chunk`` positions at a
    time, so the (tokens × vocab) logits never exist in full: the same two matmuls as autograd through
    the LM head, without the cache-thrashing full-batch log-softmax and its backward.
    """
    import torch

    rows, width = hidden.shape[0], hidden.shape[-1]
    mask = targets != IGNORE
    counts = mask.sum(-1)
    flat_hidden = hidden.detach().reshape(-1, width)
    positions = mask.reshape(-1).nonzero().squeeze(-1)
    token_rows = positions // targets.shape[1]
    token_weight = 1.0 / counts.clamp(min=1).to(hidden.dtype)[token_rows]
    token_targets = targets.reshape(-1)[positions]
    grad_hidden = torch.zeros_like(flat_hidden)
    loss = torch.zeros(rows, dtype=hidden.dtype, device=hidden.device)
    for lo in range(0, positions.numel(), max(1, token_chunk)):
        at = positions[lo: lo + token_chunk]
        logits = flat_hidden[at] @ weight.T
        target = token_targets[lo: lo + token_chunk]
        target_logit = logits.gather(1, target[:, None]).squeeze(1)
        peak = logits.amax(dim=-1, keepdim=True)
        probs = logits.sub_(peak).exp_()  # one exp per logit: shifted, then normalised in place
        total = probs.sum(dim=-1, keepdim=True)
        w = token_weight[lo: lo + token_chunk]
        log_norm = (peak + total.log()).squeeze(1)
        loss.index_add_(0, token_rows[lo: lo + token_chunk], (log_norm - target_logit) * w)
        probs.div_(total)
        probs[torch.arange(at.numel(), device=at.device), target] -= 1.0
        grad_hidden[at] = probs.mul_(w[:, None]) @ weight
    return loss, grad_hidden.view_as(hidden)


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
    outputs = [None] * len(layers)
    try:
        head = output_head(model)
        if head is not None:  # fused LM head + cross-entropy: ∂/∂hidden without full logits
            hidden = head.decoder(input_ids=input_ids, use_cache=False).last_hidden_state
            _, grad_hidden = hidden_state_loss_grad(hidden, head.weight.detach(), targets)
            outputs = [captured[i]["z"] for i in range(len(layers))]
            deltas = torch.autograd.grad(hidden, outputs, grad_outputs=grad_hidden)
        else:
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
                      chunk_size: int, method: Method = "factored", moments: Moments | None = None,
                      project_bytes: int = 256 << 20) -> Any:
    """L2-normalised projected features (n × d), in the order of ``examples``.

    Examples are processed in chunks of similar length (sorted by length: little padding), each
    chunk's gradients preconditioned (``moments`` given: candidates). Preconditioned gradients are
    buffered up to ``project_bytes`` and projected together: every pass over R costs the same memory
    traffic whatever the row count, so a projection of many rows at once is compute-bound where one
    of a single chunk is bound by reading R.
    """
    import torch

    was_training = model.training
    model.eval()  # dropout off: features are deterministic
    order = sorted(range(len(examples)), key=lambda i: (len(examples[i].input_ids), i))
    out = torch.empty(len(examples), projector.dim, dtype=projector.dtype, device=projector.device)
    row_bytes = projector.num_params * torch.empty((), dtype=projector.dtype).element_size()
    project_rows = max(1, chunk_size, project_bytes // max(1, row_bytes))
    pending: list[tuple[list[int], Any]] = []

    def flush() -> None:
        if pending:
            index = [i for rows, _ in pending for i in rows]
            grads = torch.cat([g for _, g in pending]) if len(pending) > 1 else pending[0][1]
            out[torch.tensor(index, device=out.device)] = projector.project(grads)
            pending.clear()

    try:
        for lo in range(0, len(order), max(1, chunk_size)):
            index = order[lo: lo + chunk_size]
            grads = per_example_gradients(model, [examples[i] for i in index], pad_id, method)
            with torch.no_grad():
                if moments is not None:
                    grads = adam_precondition(grads, moments.exp_avg, moments.exp_avg_sq,
                                              moments.beta1, moments.beta2, moments.eps)
                pending.append((index, grads.detach()))
                if sum(len(rows) for rows, _ in pending) >= project_rows:
                    flush()
        with torch.no_grad():
            flush()
    finally:
        model.train(was_training)
    return torch.nn.functional.normalize(out, dim=1)
