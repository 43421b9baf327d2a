"""``transformers`` backend: in-process generation (CPU or GPU) with the model's chat template.

For small runs, tests and the tiny model; no server. Requests are pulled lazily in micro-batches
of ``batch_size`` (so the engine's budget gate still runs before each send), grouped by model
and sampling parameters, left-padded and generated together. Sampling is seeded per group
(the request's seed, else one derived from its key) so a rerun of the same keys reproduces.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from models.generation.types import GenerationRequest, GenerationResponse, SamplingParams

log = logging.getLogger("jzlake.generation.transformers")


class TransformersBackend:
    """``AutoModelForCausalLM.generate`` over chat-templated prompts."""

    name = "transformers"

    def __init__(self, *, served_models: Mapping[str, str] | None = None, device: str = "auto",
                 batch_size: int = 8, dtype: str = "auto") -> None:
        self.served_models = dict(served_models or {})
        self.device = device
        self.batch_size = max(1, batch_size)
        self.dtype = dtype
        self._loaded: dict[str, tuple[Any, Any]] = {}

    def _resolve_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def load(self, model: str) -> tuple[Any, Any]:
        """Tokenizer and model for a logical model name (cached)."""
        if model not in self._loaded:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            path = self.served_models.get(model, model)
            tokenizer = AutoTokenizer.from_pretrained(path)
            tokenizer.padding_side = "left"  # decoder-only: pad on the left so generation continues the prompt
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            lm = AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype).to(self._resolve_device())
            lm.eval()
            self._loaded[model] = (tokenizer, lm)
        return self._loaded[model]

    def generate(self, requests: Iterable[GenerationRequest]) -> Iterator[GenerationResponse]:
        source = iter(requests)
        while True:
            batch = list(itertools.islice(source, self.batch_size))
            if not batch:
                return
            groups: dict[tuple[str, SamplingParams], list[GenerationRequest]] = {}
            for request in batch:
                groups.setdefault((request.model, request.sampling), []).append(request)
            for (model, sampling), group in groups.items():
                try:
                    yield from self._generate_group(model, sampling, group)
                except Exception as exc:  # e.g. out of memory: record failures, keep going
                    log.exception("transformers generation failed for %d requests", len(group))
                    for request in group:
                        yield GenerationResponse(key=request.key, text=None, finish_reason=None,
                                                 error=f"{type(exc).__name__}: {exc}"[:2000])

    def _generate_group(self, model: str, sampling: SamplingParams,
                        group: list[GenerationRequest]) -> Iterator[GenerationResponse]:
        import torch

        tokenizer, lm = self.load(model)
        started = time.perf_counter()
        prompts = [tokenizer.apply_chat_template(r.openai_messages(), add_generation_prompt=True, tokenize=False)
                   for r in group]
        encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(lm.device)
        seed = sampling.seed if sampling.seed is not None else int(group[0].key[:8], 16)
        torch.manual_seed(seed)
        kwargs: dict[str, Any] = {"max_new_tokens": sampling.max_tokens, "pad_token_id": tokenizer.pad_token_id}
        if sampling.temperature > 0:
            kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p)
        else:
            kwargs.update(do_sample=False)
        if sampling.stop:
            kwargs.update(stop_strings=list(sampling.stop), tokenizer=tokenizer)
        with torch.no_grad():
            output = lm.generate(**encoded, **kwargs)
        prompt_len = encoded["input_ids"].shape[1]
        eos_ids = set(_as_list(lm.generation_config.eos_token_id)) | {tokenizer.eos_token_id}
        per_request = (time.perf_counter() - started) / len(group)
        for row, request in enumerate(group):
            generated = output[row, prompt_len:].tolist()
            completion = _trim(generated, eos_ids, tokenizer.pad_token_id)
            ended = bool(completion) and completion[-1] in eos_ids
            finish = "length" if not ended and len(completion) >= sampling.max_tokens else "stop"
            yield GenerationResponse(
                key=request.key, text=tokenizer.decode(completion, skip_special_tokens=True),
                finish_reason=finish, prompt_tokens=int(encoded["attention_mask"][row].sum()),
                completion_tokens=len(completion), latency_s=per_request, model=model)


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


def _trim(ids: list[int], eos_ids: set[int], pad_id: int | None) -> list[int]:
    """Generated ids up to and including the first end-of-turn token; trailing padding dropped
    (a row that stopped on a stop string is padded while the rest of the batch runs on)."""
    for i, token in enumerate(ids):
        if token in eos_ids:
            return ids[: i + 1]
    end = len(ids)
    while end and ids[end - 1] == pad_id:
        end -= 1
    return ids[:end]
