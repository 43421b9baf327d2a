"""Hard spending caps (calls, tokens, USD) checked before every request, reserve-then-settle.

A request is sent only after ``Budget.reserve`` has set aside its worst case: one call, an upper
bound of its prompt tokens plus ``max_tokens``, and that many tokens at the model's list price.
Every retry of a request is one more call at the same worst case (``reserve_retry``), reserved
before the backend sends it, so the caps bound the HTTP requests the provider sees, not just the
keys. When the answer arrives ``settle`` swaps the reservation for what was really used — plus the
worst case of every attempt that timed out (the provider may have billed it; we cannot know). Because the
worst case is held while a request is in flight, any number of concurrent requests can never
push the spend past a cap. The first refused reservation stops the run (``exhausted`` then holds
a message such as ``budget exhausted: 5/5 calls used ...``); the ledger stays consistent because
nothing unreserved was ever sent.

**Per model.** Caps apply to each model separately: the account of ``tiny-llama`` (a local demo)
never eats into the allowance of the paid teacher, even when both share a ledger. The engine seeds
the accounts from the ledger (``Ledger.spent_by_model``), so a resumed run continues the same
allowance instead of starting a fresh one.

**Shards: one writer per shard, the cap split by water-filling.** Separate processes share no
memory, so parallel shards (Airflow ``.expand``) cannot share one live account. Instead each shard
gets a deterministic share of the cap and counts only the spend of its own partition of the ledger
(``shard_allowances``): with ``s_j`` the spend recorded for shard ``j`` (rows assigned to shards by
``doc_id`` hash), the level ``L`` is the largest with ``sum_j max(s_j, L) <= cap`` and shard ``i``
may spend up to ``max(s_i, L)`` (integer caps hand the remainder out as +1 to the lowest-index
shards still under ``L``). A shard only ever grows its own ``s_i`` up to its allowance, which leaves
``L`` (and the remainder) unchanged, so every shard computes the same split whenever it starts or
restarts, whatever the others have done meanwhile — and the shards together never exceed the cap,
even with uneven spend from earlier runs. This needs exactly one live process per shard (two
writers of one shard would each spend its share).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from models.generation.types import GenerationRequest

if TYPE_CHECKING:
    from jzlake.settings import GenerationBudget, ModelPrice

# Chat templates add a few special tokens per turn; generous so the bound stays a bound.
TEMPLATE_TOKENS_PER_MESSAGE = 16
TEMPLATE_TOKENS_FIXED = 16


@dataclass
class Spend:
    """What a ledger (or a run) has used: calls sent, tokens billed, USD."""

    calls: int = 0
    tokens: int = 0
    usd: float = 0.0

    def add(self, other: Spend) -> None:
        self.calls += other.calls
        self.tokens += other.tokens
        self.usd += other.usd

    def copy(self) -> Spend:
        return Spend(self.calls, self.tokens, self.usd)


@dataclass
class Reservation:
    """The worst case set aside for one request in flight; ``calls`` grows with each granted retry."""

    key: str
    model: str
    calls: int
    tokens: int
    usd: float
    call_tokens: int = 0  # the worst case of one call (what each retry adds)
    call_usd: float = 0.0


class BudgetConfigError(ValueError):
    """The caps cannot be enforced as configured (e.g. a USD cap for a model with no price)."""


def prompt_token_bound(request: GenerationRequest) -> int:
    """Upper bound of the prompt's token count without a tokenizer.

    Byte-level BPE (GPT-4, Llama 3, the tiny model) and byte-fallback SentencePiece never emit
    more tokens than UTF-8 bytes, so bytes + a per-turn template allowance bounds the count.
    """
    content_bytes = sum(len(content.encode("utf-8")) for _, content in request.messages)
    return content_bytes + TEMPLATE_TOKENS_PER_MESSAGE * len(request.messages) + TEMPLATE_TOKENS_FIXED


def find_price(prices: Mapping[str, ModelPrice], model: str) -> ModelPrice | None:
    """Exact model name first, then the longest configured prefix (``gpt-4o`` prices ``gpt-4o-2024-08-06``)."""
    if model in prices:
        return prices[model]
    matches = [name for name in prices if model.startswith(name)]
    return prices[max(matches, key=len)] if matches else None


def cost_usd(price: ModelPrice | None, prompt_tokens: int, completion_tokens: int, factor: float = 1.0) -> float:
    if price is None:
        return 0.0
    return factor * (prompt_tokens * price.input_per_1m + completion_tokens * price.output_per_1m) / 1_000_000


def shard_allowances(spends: Sequence[float], cap: float | None, *, integer: bool = True) -> list[float | None]:
    """Each shard's cap so that the shards together never exceed ``cap`` (see module docstring).

    ``spends[j]`` is what shard ``j`` has already spent; shard ``j`` may spend up to the returned
    value (its old spend when it is already over its share: it sends nothing more).
    """
    if cap is None:
        return [None] * len(spends)
    n = len(spends)
    if n == 0:
        return []
    if sum(spends) >= cap:
        return list(spends)  # nothing left to hand out
    # f(L) = sum_j max(s_j, L) grows with L; find f(L) = cap. With the k smallest spends under the
    # level, f(L) = k*L + (the rest); the first k whose solution stays below the next spend is it.
    ordered = sorted(spends)
    level = 0.0
    for k in range(1, n + 1):
        level = (cap - sum(ordered[k:])) / k
        if k == n or level <= ordered[k]:
            break
    if integer:
        level = math.floor(level + 1e-9)
    allowances: list[float | None] = [max(s, level) for s in spends]
    if integer:
        left = int(cap - sum(max(s, level) for s in spends))
        for j in range(n):  # the remainder, +1 each, to the lowest-index shards still under the level
            if left <= 0:
                break
            if spends[j] <= level:
                allowances[j] = level + 1
                left -= 1
    return allowances


@dataclass
class Budget:
    """Caps plus the running account, per model. Thread-safe: backends reserve from their own thread."""

    max_calls: int | None = None
    max_tokens: int | None = None
    max_usd: float | None = None
    prices: Mapping[str, ModelPrice] = field(default_factory=dict)
    price_factor: float = 1.0  # e.g. 0.5 for the Batch API
    spent_by_model: dict[str, Spend] = field(default_factory=dict)  # settled (ledger + this run)
    label: str = "budget"  # the settings path of the caps, for messages
    scope: str = ""  # e.g. " (shard 1/4's share of 9300)", for messages
    exhausted: str | None = field(default=None, init=False)
    _reserved: dict[str, Spend] = field(default_factory=dict, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    @classmethod
    def from_settings(cls, caps: GenerationBudget, prices: Mapping[str, ModelPrice], *,
                      spent: Mapping[str, Spend] | None = None, price_factor: float = 1.0,
                      label: str = "generation.teacher_budget") -> Budget:
        return cls(max_calls=caps.max_calls, max_tokens=caps.max_tokens, max_usd=caps.max_usd,
                   prices=dict(prices), price_factor=price_factor,
                   spent_by_model={m: s.copy() for m, s in (spent or {}).items()}, label=label)

    # ---- accounts --------------------------------------------------------------------------

    @property
    def spent(self) -> Spend:
        """Settled spend summed over the models of this budget."""
        with self._lock:
            return _total(self.spent_by_model.values())

    @property
    def reserved(self) -> Spend:
        """Reservations in flight, summed over models."""
        with self._lock:
            return _total(self._reserved.values())

    def spent_for(self, model: str) -> Spend:
        with self._lock:
            return self.spent_by_model.get(model, Spend()).copy()

    # ---- pricing ---------------------------------------------------------------------------

    def price(self, model: str) -> ModelPrice | None:
        return find_price(self.prices, model)

    def is_paid(self, model: str) -> bool:
        """The price table bills this model (a non-zero input or output price)."""
        price = self.price(model)
        return price is not None and (price.input_per_1m > 0 or price.output_per_1m > 0)

    def cost(self, model: str, prompt_tokens: int, completion_tokens: int) -> float:
        return cost_usd(self.price(model), prompt_tokens, completion_tokens, self.price_factor)

    def check_models(self, models: set[str]) -> None:
        """Fail before anything is sent when a USD cap cannot be enforced for some model."""
        if self.max_usd is None:
            return
        missing = sorted(m for m in models if self.price(m) is None)
        if missing:
            raise BudgetConfigError(
                f"{self.label}.max_usd is set but generation.prices has no entry for {missing}; "
                "add input_per_1m/output_per_1m for these models (or a prefix of their names), "
                "or unset max_usd")

    # ---- reserve / settle ------------------------------------------------------------------

    def worst_case(self, request: GenerationRequest) -> tuple[int, float]:
        """(tokens, USD) one call of ``request`` may cost at most."""
        bound = prompt_token_bound(request)
        return bound + request.sampling.max_tokens, self.cost(request.model, bound, request.sampling.max_tokens)

    def reserve(self, request: GenerationRequest, *, count_call: bool = True,
                force: bool = False) -> Reservation | None:
        """Set aside the worst case of ``request``; ``None`` (and ``exhausted`` set) when a cap refuses.

        ``count_call=False`` reserves tokens/USD for a call already counted (a resumed batch);
        ``force=True`` records the reservation even past a cap (work already submitted).
        """
        tokens, usd = self.worst_case(request)
        calls = 1 if count_call else 0
        with self._lock:
            if self.exhausted is not None and not force:
                return None
            refusal = None if force else self._refusal(request.model, calls, tokens, usd)
            if refusal is not None:
                self.exhausted = refusal
                return None
            self._reserved.setdefault(request.model, Spend()).add(Spend(calls, tokens, usd))
            return Reservation(request.key, request.model, calls, tokens, usd, tokens, usd)

    def reserve_retry(self, reservation: Reservation) -> bool:
        """One more call (a retry) at the worst case of one call; ``False`` (and ``exhausted``) when refused."""
        with self._lock:
            refusal = self._refusal(reservation.model, 1, reservation.call_tokens, reservation.call_usd)
            if refusal is not None:
                self.exhausted = self.exhausted or refusal
                return False
            reservation.calls += 1
            reservation.tokens += reservation.call_tokens
            reservation.usd += reservation.call_usd
            self._reserved.setdefault(reservation.model, Spend()).add(
                Spend(1, reservation.call_tokens, reservation.call_usd))
            return True

    def undo_retry(self, reservation: Reservation) -> None:
        """Take back a granted ``reserve_retry`` (its durable note could not be committed)."""
        with self._lock:
            reservation.calls -= 1
            reservation.tokens -= reservation.call_tokens
            reservation.usd -= reservation.call_usd
            self._reserved.setdefault(reservation.model, Spend()).add(
                Spend(-1, -reservation.call_tokens, -reservation.call_usd))

    def sync_spent(self, model: str, durable: Spend) -> None:
        """Set ``model``'s account from the ledger's durable rows (which include this run's reservations).

        Several processes on one ledger share no memory: before each write-through claim the engine
        re-reads what every run has spent, so the caps hold across processes.
        """
        with self._lock:
            reserved = self._reserved.get(model, Spend())
            self.spent_by_model[model] = Spend(durable.calls - reserved.calls, durable.tokens - reserved.tokens,
                                               durable.usd - reserved.usd)

    def over_cap(self, model: str) -> str | None:
        """A message when ``model``'s spend plus reservations is already past a cap, else ``None``."""
        with self._lock:
            return self._refusal(model, 0, 0, 0.0)

    def _refusal(self, model: str, calls: int, tokens: int, usd: float) -> str | None:
        spent = self.spent_by_model.get(model, Spend())
        reserved = self._reserved.get(model, Spend())
        used = Spend(spent.calls + reserved.calls, spent.tokens + reserved.tokens, spent.usd + reserved.usd)
        where = f"for {model}{self.scope}"
        if self.max_calls is not None and used.calls + calls > self.max_calls:
            return (f"budget exhausted: {used.calls}/{self.max_calls} calls used "
                    f"(cap {self.label}.max_calls) {where}")
        if self.max_tokens is not None and used.tokens + tokens > self.max_tokens:
            return (f"budget exhausted: {used.tokens}/{self.max_tokens} tokens used or reserved, the next "
                    f"request may need up to {tokens} (cap {self.label}.max_tokens) {where}")
        if self.max_usd is not None and used.usd + usd > self.max_usd + 1e-12:
            return (f"budget exhausted: ${used.usd:.4f}/${self.max_usd:.4f} used or reserved, the next "
                    f"request may cost up to ${usd:.4f} (cap {self.label}.max_usd) {where}")
        return None

    def settle(self, reservation: Reservation, prompt_tokens: int, completion_tokens: int,
               calls: int | None = None, possibly_billed: int = 0) -> float:
        """Replace the reservation by actual use; returns the request's cost in USD (see ``settle_spend``)."""
        return self.settle_spend(reservation, prompt_tokens, completion_tokens, calls, possibly_billed).usd

    def settle_spend(self, reservation: Reservation, prompt_tokens: int, completion_tokens: int,
                     calls: int | None = None, possibly_billed: int = 0) -> Spend:
        """Replace the reservation by actual use; returns what the request is charged.

        ``calls``: the HTTP attempts really made (default: the calls reserved). ``possibly_billed``:
        attempts that timed out — the provider may have done (and billed) the work, so each is
        charged at the worst case of one call on top of the answer's real tokens.
        """
        tokens = prompt_tokens + completion_tokens + possibly_billed * reservation.call_tokens
        usd = self.cost(reservation.model, prompt_tokens, completion_tokens) + possibly_billed * reservation.call_usd
        used_calls = reservation.calls if calls is None else calls
        with self._lock:
            self._reserved.setdefault(reservation.model, Spend()).add(
                Spend(-reservation.calls, -reservation.tokens, -reservation.usd))
            self.spent_by_model.setdefault(reservation.model, Spend()).add(Spend(used_calls, tokens, usd))
        return Spend(used_calls, tokens, usd)

    def release(self, reservation: Reservation) -> None:
        """Give back a reservation whose request was never sent."""
        with self._lock:
            self._reserved.setdefault(reservation.model, Spend()).add(
                Spend(-reservation.calls, -reservation.tokens, -reservation.usd))

    def remaining(self, model: str | None = None) -> dict[str, float | None]:
        """Head-room per cap (``None`` = uncapped) for ``model`` (default: all models summed), for reports."""
        with self._lock:
            if model is None:
                spent, reserved = _total(self.spent_by_model.values()), _total(self._reserved.values())
            else:
                spent, reserved = self.spent_by_model.get(model, Spend()), self._reserved.get(model, Spend())

            def left(cap: float | None, used: float) -> float | None:
                return None if cap is None else max(0.0, cap - used)
            return {"calls": left(self.max_calls, spent.calls + reserved.calls),
                    "tokens": left(self.max_tokens, spent.tokens + reserved.tokens),
                    "usd": left(self.max_usd, spent.usd + reserved.usd)}


def _total(spends: object) -> Spend:
    total = Spend()
    for spend in spends:  # type: ignore[attr-defined]
        total.add(spend)
    return total


def unlimited() -> Budget:
    """A budget with no caps (tests, local servers)."""
    return Budget(max_calls=None, max_tokens=None, max_usd=None, label="budget")


__all__ = ["Budget", "BudgetConfigError", "Reservation", "Spend", "cost_usd", "find_price",
           "prompt_token_bound", "shard_allowances", "unlimited"]
