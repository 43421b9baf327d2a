"""``vllm`` backend: offline ``LLM.chat`` on GPUs (mass synthesis at scale).

vLLM is imported only when ``generate`` runs, so CPU installs (and CI) never need it; it lives
in the ``[gpu]`` extra. Using the backend without it raises ``VllmUnavailableError`` naming the
fix. Tensor parallelism is vLLM's own (``tensor_parallel_size`` GPUs per replica). Data
parallelism runs ``data_parallel_size`` independent replicas, each in a spawned process that
sees only its own ``tensor_parallel_size`` GPUs (``CUDA_VISIBLE_DEVICES``) and generates a
round-robin share of the requests; for dense models that is exactly vLLM's data parallel mode,
without the cross-process coordination only MoE expert parallelism needs.

Offline generation is one send for the whole list: the engine reserves the budget for every
request before the call (local GPUs cost no USD; the call and token caps still apply).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict
from typing import Any

from models.generation.types import GenerationRequest, GenerationResponse

log = logging.getLogger("jzlake.generation.vllm")


class VllmUnavailableError(RuntimeError):
    """vLLM is not installed (CPU install) but the ``vllm`` backend was asked for."""


def import_vllm() -> Any:
    """Import vllm or explain how to get it."""
    try:
        import vllm
    except ImportError as exc:
        raise VllmUnavailableError(
            "generation backend 'vllm' needs the vllm package and a CUDA GPU, but vllm is not installed: "
            "install the GPU extra (pip install 'jiuzhang-lake[gpu]') on a GPU machine, or set "
            "generation.backend to 'openai' (any OpenAI-compatible server, e.g. `make llm-up`) or "
            "'transformers' (in-process, CPU or GPU)") from exc
    return vllm


def _sampling_params(vllm: Any, request: GenerationRequest) -> Any:
    s = request.sampling
    return vllm.SamplingParams(temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_tokens,
                               seed=s.seed, stop=list(s.stop) or None)


def generate_shard(engine_kwargs: dict[str, Any], requests: list[GenerationRequest]) -> list[GenerationResponse]:
    """One replica: load the model once, ``LLM.chat`` every conversation, map outputs back in order."""
    vllm = import_vllm()
    llm = vllm.LLM(**engine_kwargs)
    started = time.perf_counter()
    outputs = llm.chat([r.openai_messages() for r in requests], [_sampling_params(vllm, r) for r in requests],
                       use_tqdm=False)
    per_request = (time.perf_counter() - started) / max(1, len(requests))
    responses = []
    for request, output in zip(requests, outputs, strict=True):
        completion = output.outputs[0]
        responses.append(GenerationResponse(
            key=request.key, text=completion.text, finish_reason=completion.finish_reason,
            prompt_tokens=len(output.prompt_token_ids or []), completion_tokens=len(completion.token_ids),
            latency_s=per_request, model=str(engine_kwargs.get("model"))))
    return responses


def _replica_main(rank: int, devices: str, engine_kwargs: dict[str, Any], payload: list[dict],
                  results: Any) -> None:
    # Runs in a spawned process: pin the GPUs before vllm/torch initialise CUDA.
    os.environ["CUDA_VISIBLE_DEVICES"] = devices
    try:
        requests = [GenerationRequest.from_dict(item) for item in payload]
        results.put((rank, [asdict(r) for r in generate_shard(engine_kwargs, requests)], None))
    except BaseException as exc:  # report, do not hang the parent
        results.put((rank, [], f"{type(exc).__name__}: {exc}"))


class VllmBackend:
    """Offline vLLM generation with tensor and data parallelism from settings."""

    name = "vllm"

    def __init__(self, *, served_models: Mapping[str, str] | None = None, tensor_parallel_size: int = 1,
                 data_parallel_size: int = 1, gpu_memory_utilization: float = 0.9,
                 max_model_len: int | None = None, dtype: str = "auto", enforce_eager: bool = False,
                 seed: int = 0) -> None:
        self.served_models = dict(served_models or {})
        self.tensor_parallel_size = tensor_parallel_size
        self.data_parallel_size = data_parallel_size
        self.gpu_memory_utilization = gpu_memory_utilization
        self.max_model_len = max_model_len
        self.dtype = dtype
        self.enforce_eager = enforce_eager
        self.seed = seed

    def engine_kwargs(self, model: str) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "model": self.served_models.get(model, model), "tensor_parallel_size": self.tensor_parallel_size,
            "gpu_memory_utilization": self.gpu_memory_utilization, "dtype": self.dtype,
            "enforce_eager": self.enforce_eager, "seed": self.seed,
        }
        if self.max_model_len:
            kwargs["max_model_len"] = self.max_model_len
        return kwargs

    def generate(self, requests: Iterable[GenerationRequest]) -> Iterator[GenerationResponse]:
        """Generate every request (pulled all at once: offline batch), grouped by model."""
        pending = list(requests)
        if not pending:
            return
        import_vllm()  # fail before any work when vllm is missing
        by_model: dict[str, list[GenerationRequest]] = {}
        for request in pending:
            by_model.setdefault(request.model, []).append(request)
        for model, group in by_model.items():
            kwargs = self.engine_kwargs(model)
            if self.data_parallel_size <= 1:
                yield from generate_shard(kwargs, group)
            else:
                yield from self._data_parallel(kwargs, group)

    def _data_parallel(self, engine_kwargs: dict[str, Any],
                       requests: list[GenerationRequest]) -> Iterator[GenerationResponse]:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")  # CUDA cannot be forked
        results = ctx.Queue()
        dp, tp = self.data_parallel_size, self.tensor_parallel_size
        processes = []
        for rank in range(dp):
            share = [r.to_dict() for r in requests[rank::dp]]
            devices = ",".join(str(gpu) for gpu in range(rank * tp, (rank + 1) * tp))
            proc = ctx.Process(target=_replica_main, args=(rank, devices, engine_kwargs, share, results))
            proc.start()
            processes.append(proc)
        errors = []
        for _ in range(dp):
            rank, rows, error = results.get()
            if error:
                errors.append(f"replica {rank}: {error}")
            for row in rows:
                yield GenerationResponse(**row)
        for proc in processes:
            proc.join()
        if errors:
            raise RuntimeError("vLLM data-parallel replicas failed (their keys stay pending; rerun "
                               "resumes them): " + "; ".join(errors))
