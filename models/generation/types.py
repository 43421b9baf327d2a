"""The data that crosses the generation interface. Backends, the ledger and the jobs share it."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from jzlake.lineage import stable_hash


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 2500
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SamplingParams:
        """Inverse of ``as_dict`` (``stop`` may come back from JSON as a list)."""
        data = dict(data)
        data["stop"] = tuple(data.get("stop") or ())
        return cls(**data)


@dataclass(frozen=True)
class GenerationRequest:
    """One chat completion to make. ``key`` is the ledger key: a hash of everything that
    determines the answer (model, template id + hash, rendered prompt, sampling, sample index)."""

    model: str
    messages: tuple[tuple[str, str], ...]  # (role, content) pairs
    sampling: SamplingParams
    template_id: str
    template_hash: str
    sample_index: int = 0
    lineage: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def key(self) -> str:
        return stable_hash(
            self.model, self.template_id, self.template_hash, list(self.messages),
            self.sampling.as_dict(), self.sample_index, length=40,
        )

    def openai_messages(self) -> list[dict[str, str]]:
        return [{"role": role, "content": content} for role, content in self.messages]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (requests files for subprocess runs and benchmarks)."""
        return {"model": self.model, "messages": [list(m) for m in self.messages],
                "sampling": self.sampling.as_dict(), "template_id": self.template_id,
                "template_hash": self.template_hash, "sample_index": self.sample_index,
                "lineage": dict(self.lineage)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationRequest:
        return cls(model=data["model"], messages=tuple((r, c) for r, c in data["messages"]),
                   sampling=SamplingParams.from_dict(data.get("sampling") or {}),
                   template_id=data["template_id"], template_hash=data["template_hash"],
                   sample_index=int(data.get("sample_index", 0)), lineage=dict(data.get("lineage") or {}))


# Lineage keys the ledger stores in their own columns (everything in ``lineage`` is also kept
# as JSON): source document, excerpt character offsets, the model's URI/version, the seed.
LINEAGE_COLUMNS = {"doc_id": str, "excerpt_start": int, "excerpt_end": int,
                   "model_uri": str, "model_version": str, "seed": int}


@dataclass(frozen=True)
class GenerationResponse:
    key: str
    text: str | None
    finish_reason: str | None  # "stop", "length", ... ; None on error
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    model: str | None = None  # the model name/version the server reported
    error: str | None = None  # set when the call failed for good (after retries)
    attempts: int = 1  # HTTP attempts made for this response (retries included)

    @property
    def ok(self) -> bool:
        return self.error is None and self.text is not None


class Backend(Protocol):
    """Anything that turns requests into responses (order of results is free; keys match).

    Online backends pull ``requests`` lazily, one just before it is sent: the engine's budget
    gate lives in that iterator, so stopping the iteration stops sending. Batch/offline
    backends pull everything first (the whole batch is one send).
    """

    name: str

    def generate(self, requests: Iterable[GenerationRequest]) -> Iterator[GenerationResponse]: ...
