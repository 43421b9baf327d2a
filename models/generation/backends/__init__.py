"""Generation backends behind one ``generate(requests) -> responses`` interface.

``make_backend(settings, name)`` builds one from ``settings.generation``:

=============  ==============================================================================
openai         chat completions, any OpenAI-compatible server (OpenAI, vLLM, transformers serve)
openai-batch   the Batch API (Files + Batches), resumable by batch id through the ledger
vllm           offline ``LLM.chat`` on GPUs (``[gpu]`` extra; imported lazily)
transformers   in-process ``generate`` (CPU or GPU), for small runs and the tiny model
=============  ==============================================================================

Each backend module imports its heavy dependency (openai, vllm, torch) only when used.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import SecretStr

if TYPE_CHECKING:
    from jzlake.settings import Settings
    from models.generation.types import Backend

BACKENDS = ("openai", "openai-batch", "vllm", "transformers")


def resolve_api_key(settings: Settings, environ: Mapping[str, str] | None = None) -> SecretStr | None:
    """The API key named by the settings, as a ``SecretStr`` (never logged; ``None`` when unset).

    ``generation.api_key_conn_id`` (an Airflow connection: its password, or ``api_key`` in its
    extras) wins over ``generation.api_key_env`` (an environment variable's name).
    """
    config = settings.generation
    if config.api_key_conn_id:
        from airflow.sdk import BaseHook  # only when a connection is configured

        conn = BaseHook.get_connection(config.api_key_conn_id)
        value = conn.password or (conn.extra_dejson or {}).get("api_key")
        if not value:
            raise ValueError(f"Airflow connection {config.api_key_conn_id!r} (generation.api_key_conn_id) holds "
                             "no API key: put it in the connection's password (or extra 'api_key')")
        return SecretStr(value)
    if config.api_key_env:
        value = (os.environ if environ is None else environ).get(config.api_key_env)
        return SecretStr(value) if value else None
    return None


def _model_paths(settings: Settings) -> dict[str, str]:
    # In-process backends load from disk: a relative path that exists under the repo home is
    # resolved against it; anything else (a Hub id, an absolute path) is passed through.
    paths = {}
    for name, value in settings.generation.served_models.items():
        local = settings.path(value)
        paths[name] = local if Path(local).exists() else value
    return paths


def make_backend(settings: Settings, name: str | None = None, *, environ: Mapping[str, str] | None = None,
                 **overrides: Any) -> Backend:
    """Build the backend ``name`` (default ``settings.generation.backend``); ``overrides`` win."""
    config = settings.generation
    name = name or config.backend
    if name == "openai":
        from models.generation.backends.openai_backend import OpenAIBackend

        kwargs: dict[str, Any] = dict(
            base_url=config.base_url, api_key=resolve_api_key(settings, environ), concurrency=config.concurrency,
            timeout_s=config.request_timeout_s, max_retries=config.max_retries,
            backoff_initial_s=config.backoff_initial_s, backoff_max_s=config.backoff_max_s,
            max_retry_after_s=config.max_retry_after_s, served_models=config.served_models,
            max_tokens_param=config.max_tokens_param)
        return OpenAIBackend(**{**kwargs, **overrides})
    if name == "openai-batch":
        from models.generation.backends.openai_batch import OpenAIBatchBackend

        kwargs = dict(base_url=config.base_url, api_key=resolve_api_key(settings, environ),
                      served_models=config.served_models, max_tokens_param=config.max_tokens_param,
                      timeout_s=config.request_timeout_s, max_retries=config.max_retries,
                      poll_interval_s=config.batch_poll_interval_s,
                      max_requests_per_batch=config.batch_max_requests)
        return OpenAIBatchBackend(**{**kwargs, **overrides})
    if name == "vllm":
        from models.generation.backends.vllm_backend import VllmBackend

        kwargs = dict(served_models=_model_paths(settings), **config.vllm.model_dump())
        return VllmBackend(**{**kwargs, **overrides})
    if name == "transformers":
        from models.generation.backends.transformers_backend import TransformersBackend

        kwargs = dict(served_models=_model_paths(settings), device=config.transformers_device,
                      batch_size=config.transformers_batch_size)
        return TransformersBackend(**{**kwargs, **overrides})
    raise ValueError(f"unknown generation backend {name!r}; choose one of {', '.join(BACKENDS)} "
                     "(settings: generation.backend)")
