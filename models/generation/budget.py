"""Hard spending caps (calls, tokens, USD) checked before every request, reserve-then-settle.

A request is sent only after ``Budget.reserve`` has set aside its worst case: one call, an upper
bound of its prompt tokens plus ``max_tokens``, and that many tokens at the model's list price.
When the answer arrives ``settle`` swaps the reservation for what was really used. Because the
worst case is held while a request is in flight, any number of concurrent requests can never
push the spend past a cap. The first refused reservation stops the run (``exhausted`` then holds
a message such as ``budget exhausted: 5/5 calls used ...``); the ledger stays consistent because
nothing unreserved was ever sent.

Caps cover the whole ledger: the engine seeds ``spent`` from it, so a resumed run continues the
same allowance instead of starting a fresh one.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
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


@dataclass(frozen=True)
class Reservation:
    key: str
    model: str
    calls: int
    tokens: int
    usd: float


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


@dataclass
class Budget:
    """Caps plus the running account. Thread-safe: backends may reserve from their own thread."""

    max_calls: int | None = None
    max_tokens: int | None = None
    max_usd: float | None = None
    prices: Mapping[str, ModelPrice] = field(default_factory=dict)
    price_factor: float = 1.0  # e.g. 0.5 for the Batch API
    spent: Spend = field(default_factory=Spend)  # settled (from the ledger + this run)
    label: str = "budget"  # the settings path of the caps, for messages
    reserved: Spend = field(default_factory=Spend, init=False)
    exhausted: str | None = field(default=None, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    @classmethod
    def from_settings(cls, caps: GenerationBudget, prices: Mapping[str, ModelPrice], *,
                      spent: Spend | None = None, price_factor: float = 1.0,
                      label: str = "generation.teacher_budget") -> Budget:
        return cls(max_calls=caps.max_calls, max_tokens=caps.max_tokens, max_usd=caps.max_usd,
                   prices=dict(prices), price_factor=price_factor, spent=spent or Spend(), label=label)

    # ---- pricing ---------------------------------------------------------------------------

    def price(self, model: str) -> ModelPrice | None:
        return find_price(self.prices, model)

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

    def reserve(self, request: GenerationRequest, *, count_call: bool = True,
                force: bool = False) -> Reservation | None:
        """Set aside the worst case of ``request``; ``None`` (and ``exhausted`` set) when a cap refuses.

        ``count_call=False`` reserves tokens/USD for a call already counted (a resumed batch);
        ``force=True`` records the reservation even past a cap (work already submitted).
        """
        tokens = prompt_token_bound(request) + request.sampling.max_tokens
        usd = self.cost(request.model, prompt_token_bound(request), request.sampling.max_tokens)
        calls = 1 if count_call else 0
        with self._lock:
            if self.exhausted is not None and not force:
                return None
            refusal = None if force else self._refusal(calls, tokens, usd)
            if refusal is not None:
                self.exhausted = refusal
                return None
            self.reserved.add(Spend(calls, tokens, usd))
            return Reservation(request.key, request.model, calls, tokens, usd)

    def _refusal(self, calls: int, tokens: int, usd: float) -> str | None:
        used = Spend(self.spent.calls + self.reserved.calls, self.spent.tokens + self.reserved.tokens,
                     self.spent.usd + self.reserved.usd)
        if self.max_calls is not None and used.calls + calls > self.max_calls:
            return (f"budget exhausted: {used.calls}/{self.max_calls} calls used "
                    f"(cap {self.label}.max_calls)")
        if self.max_tokens is not None and used.tokens + tokens > self.max_tokens:
            return (f"budget exhausted: {used.tokens}/{self.max_tokens} tokens used or reserved, the next "
                    f"request may need up to {tokens} (cap {self.label}.max_tokens)")
        if self.max_usd is not None and used.usd + usd > self.max_usd + 1e-12:
            return (f"budget exhausted: ${used.usd:.4f}/${self.max_usd:.4f} used or reserved, the next "
                    f"request may cost up to ${usd:.4f} (cap {self.label}.max_usd)")
        return None

    def settle(self, reservation: Reservation, prompt_tokens: int, completion_tokens: int) -> float:
        """Replace the reservation by actual use; returns the request's cost in USD."""
        usd = self.cost(reservation.model, prompt_tokens, completion_tokens)
        with self._lock:
            self.reserved.add(Spend(-reservation.calls, -reservation.tokens, -reservation.usd))
            self.spent.add(Spend(reservation.calls, prompt_tokens + completion_tokens, usd))
        return usd

    def release(self, reservation: Reservation) -> None:
        """Give back a reservation whose request was never sent."""
        with self._lock:
            self.reserved.add(Spend(-reservation.calls, -reservation.tokens, -reservation.usd))

    def remaining(self) -> dict[str, float | None]:
        """Head-room per cap (``None`` = uncapped), for reports."""
        with self._lock:
            def left(cap: float | None, used: float) -> float | None:
                return None if cap is None else max(0.0, cap - used)
            return {"calls": left(self.max_calls, self.spent.calls + self.reserved.calls),
                    "tokens": left(self.max_tokens, self.spent.tokens + self.reserved.tokens),
                    "usd": left(self.max_usd, self.spent.usd + self.reserved.usd)}


def unlimited() -> Budget:
    """A budget with no caps (tests, local servers)."""
    return Budget(max_calls=None, max_tokens=None, max_usd=None, label="budget")


__all__ = ["Budget", "BudgetConfigError", "Reservation", "Spend", "cost_usd", "find_price",
           "prompt_token_bound", "unlimited"]
