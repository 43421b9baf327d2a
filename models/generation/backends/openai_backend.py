"""``openai`` backend: chat completions against OpenAI or any OpenAI-compatible server.

Works with api.openai.com, vLLM's server and ``transformers serve``. Async with bounded
concurrency (an asyncio loop in a worker thread; ``generate`` stays a plain iterator so the
engine's budget gate and ledger need no async code). The SDK's own retries are off
(``max_retries=0``) so that every attempt is counted and the policy is ours:

* retried: 408, 409, 429, 5xx, timeouts and connection errors — exponential backoff with
  jitter, or exactly the server's ``Retry-After`` / ``retry-after-ms`` when it sends one
  (capped at ``max_retry_after_s``);
* not retried: other 4xx (bad request, auth, not found) — they fail the key at once, with the
  server's message, and the next run tries again (up to ``generation.max_attempts_per_key``).

Every HTTP attempt is a billable call: before a retry, ``generate(..., before_retry=...)`` asks the
engine, which reserves one more call in the budget (and, write-through, notes it in the ledger);
a refusal ends that key's retries with an ``(interrupted: ...)`` error. An attempt that timed out
is reported through ``possibly_billed(request)``: the server may have done the work, so the
engine charges it at its worst case. Requests are pulled from
the engine's stream and the hook is called in worker threads, never on the event loop, so a
ledger commit there does not stall requests in flight.

Each request carries its ledger key in the ``X-JZLake-Request-Key`` header so proxies and
logs can tell keys apart. The API key is held as a ``SecretStr``, never logged, and scrubbed
from any error text that reaches the ledger.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import queue
import random
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pydantic import SecretStr

from models.generation.ledger import INTERRUPTED
from models.generation.types import GenerationRequest, GenerationResponse

log = logging.getLogger("jzlake.generation.openai")

KEY_HEADER = "X-JZLake-Request-Key"
RETRYABLE_STATUS = frozenset({408, 409, 429})
_END = object()
RetryGate = Callable[[GenerationRequest, int], bool]
BilledHook = Callable[[GenerationRequest], None]
_SECRET_PATTERN = re.compile(r"\b(sk-[A-Za-z0-9_\-*]{4,}|Bearer\s+\S+)")


def redact(text: str, secret: SecretStr | None = None) -> str:
    """Remove an API key (and anything shaped like one) from ``text``."""
    if secret is not None:
        value = secret.get_secret_value()
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return _SECRET_PATTERN.sub("***", text)


def parse_retry_after(headers: Mapping[str, str] | None, now: float | None = None) -> float | None:
    """Seconds the server asked us to wait: ``retry-after-ms``, then ``Retry-After`` (seconds or an HTTP date)."""
    if not headers:
        return None
    lower = {k.lower(): v for k, v in headers.items()}
    for name, divisor in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = lower.get(name)
        if value is None:
            continue
        try:
            return max(0.0, float(value) / divisor)
        except ValueError:
            pass
    value = lower.get("retry-after")
    if value:
        parsed = email.utils.parsedate_tz(value)
        if parsed is not None:
            return max(0.0, email.utils.mktime_tz(parsed) - (now if now is not None else time.time()))
    return None


def backoff_delay(attempt: int, initial: float, maximum: float, rng: random.Random) -> float:
    """Exponential backoff with "equal jitter": half the step fixed, half random (attempt starts at 1)."""
    step = min(maximum, initial * 2 ** (attempt - 1))
    return step / 2 + rng.uniform(0, step / 2)


def chat_body(request: GenerationRequest, served_models: Mapping[str, str] | None = None,
              max_tokens_param: str = "max_tokens") -> dict[str, Any]:
    """The chat-completions body for ``request`` (also each line's ``body`` in a Batch API file)."""
    sampling = request.sampling
    body: dict[str, Any] = {
        "model": (served_models or {}).get(request.model, request.model),
        "messages": request.openai_messages(),
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        max_tokens_param: sampling.max_tokens,
    }
    if sampling.seed is not None:
        body["seed"] = sampling.seed
    if sampling.stop:
        body["stop"] = list(sampling.stop)
    return body


class OpenAIBackend:
    """Online chat completions with retries, Retry-After and bounded concurrency."""

    name = "openai"
    pulls_concurrently = True  # pulls from its own thread and accepts ``before_retry``


    def __init__(self, base_url: str, api_key: SecretStr | str | None = None, *, concurrency: int = 8,
                 timeout_s: float = 120.0, max_retries: int = 6, backoff_initial_s: float = 1.0,
                 backoff_max_s: float = 60.0, max_retry_after_s: float = 300.0,
                 served_models: Mapping[str, str] | None = None, max_tokens_param: str = "max_tokens",
                 seed: int | None = None) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self.base_url = base_url
        self._api_key = api_key if isinstance(api_key, SecretStr) or api_key is None else SecretStr(api_key)
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.max_retry_after_s = max_retry_after_s
        self.served_models = dict(served_models or {})
        self.max_tokens_param = max_tokens_param
        self._rng = random.Random(seed)

    @property
    def api_key_in_use(self) -> bool:
        """Requests carry an API key (a paid endpoint: the engine then always writes the ledger through)."""
        return self._api_key is not None and bool(self._api_key.get_secret_value())

    def __repr__(self) -> str:
        key = "set (redacted)" if self._api_key is not None else "none"
        return f"OpenAIBackend(base_url={self.base_url!r}, api_key={key}, concurrency={self.concurrency})"

    # ---- request shaping -------------------------------------------------------------------

    def request_body(self, request: GenerationRequest) -> dict[str, Any]:
        """The chat-completions body for ``request``."""
        return chat_body(request, self.served_models, self.max_tokens_param)

    def _client(self) -> Any:
        from openai import AsyncOpenAI

        key = self._api_key.get_secret_value() if self._api_key is not None else "no-key-needed"
        return AsyncOpenAI(base_url=self.base_url, api_key=key, max_retries=0, timeout=self.timeout_s)

    # ---- one request with retries ------------------------------------------------------------

    async def _one(self, client: Any, request: GenerationRequest, stop: threading.Event | None = None,
                   before_retry: RetryGate | None = None, pool: ThreadPoolExecutor | None = None,
                   possibly_billed: BilledHook | None = None) -> GenerationResponse:
        import openai

        started = time.perf_counter()
        body = self.request_body(request)
        attempt = 0
        while True:
            attempt += 1
            try:
                completion = await client.chat.completions.create(
                    **body, extra_headers={KEY_HEADER: request.key})
                choice = completion.choices[0] if completion.choices else None
                usage = completion.usage
                if choice is None:
                    raise ValueError("the server returned no choices")
                return GenerationResponse(
                    key=request.key, text=choice.message.content or "", finish_reason=choice.finish_reason,
                    prompt_tokens=usage.prompt_tokens if usage else 0,
                    completion_tokens=usage.completion_tokens if usage else 0,
                    latency_s=time.perf_counter() - started, model=completion.model, attempts=attempt)
            except openai.APIStatusError as exc:
                retryable = exc.status_code in RETRYABLE_STATUS or exc.status_code >= 500
                error = f"HTTP {exc.status_code}: {exc.message}"
                wait = parse_retry_after(dict(exc.response.headers)) if retryable else None
            except (openai.APITimeoutError, openai.APIConnectionError) as exc:
                retryable, wait = True, None
                error = f"{type(exc).__name__}: {exc}"
                if isinstance(exc, openai.APITimeoutError) and possibly_billed is not None:
                    possibly_billed(request)  # sent, no answer: the server may have done it
            except Exception as exc:  # malformed answer etc.: not worth a retry storm
                retryable, wait = False, None
                error = f"{type(exc).__name__}: {exc}"
            note = None
            if not retryable:
                note = "(not retryable)"
            elif attempt > self.max_retries:
                note = f"(gave up after {attempt} attempts)"
            elif stop is not None and stop.is_set():
                note = f"{INTERRUPTED}run stopped)"
            if note is None:
                if wait is not None:
                    delay = min(wait, self.max_retry_after_s)
                else:
                    delay = backoff_delay(attempt, self.backoff_initial_s, self.backoff_max_s, self._rng)
                log.info("key %s attempt %d failed (%s); retrying in %.2fs", request.key[:12], attempt,
                         redact(error, self._api_key)[:200], delay)
                await asyncio.sleep(delay)
                # The retry is one more billable call: the engine reserves it (off the event loop).
                if before_retry is not None and not await asyncio.get_running_loop().run_in_executor(
                        pool, before_retry, request, attempt + 1):
                    note = f"{INTERRUPTED}no budget left for retry {attempt + 1}, or the run stopped)"
                else:
                    continue
            return GenerationResponse(
                key=request.key, text=None, finish_reason=None, latency_s=time.perf_counter() - started,
                error=redact(f"{error} {note}", self._api_key)[:2000], attempts=attempt)

    # ---- the stream ------------------------------------------------------------------------

    async def _produce(self, requests: Iterator[GenerationRequest], out: queue.Queue, stop: threading.Event,
                       before_retry: RetryGate | None = None, possibly_billed: BilledHook | None = None) -> None:
        client = self._client()
        slots = asyncio.Semaphore(self.concurrency)
        tasks: set[asyncio.Task] = set()
        loop = asyncio.get_running_loop()
        # Pulls and retry gates may block on ledger commits: they run here, off the event loop.
        pool = ThreadPoolExecutor(max_workers=self.concurrency + 1, thread_name_prefix="openai-gate")

        async def run(request: GenerationRequest) -> None:
            try:
                out.put(await self._one(client, request, stop, before_retry, pool, possibly_billed))
            finally:
                slots.release()

        try:
            while not stop.is_set():
                await slots.acquire()
                # Pull only once a slot is free: the engine's budget is reserved right before the send.
                request = await loop.run_in_executor(pool, next, requests, None)
                if request is None or stop.is_set():  # (a request pulled now is released by the engine)
                    slots.release()
                    break
                task = asyncio.create_task(run(request))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            while tasks:
                await asyncio.gather(*list(tasks))
        finally:
            for task in tasks:
                task.cancel()
            await client.close()
            pool.shutdown(wait=False, cancel_futures=True)

    def generate(self, requests: Iterable[GenerationRequest], *, before_retry: RetryGate | None = None,
                 possibly_billed: BilledHook | None = None) -> Iterator[GenerationResponse]:
        """Send ``requests`` (pulled lazily), yield responses as they complete (any order).

        ``before_retry(request, attempt) -> bool`` is asked before every retry (attempt >= 2);
        ``False`` ends that request's retries. ``possibly_billed(request)`` hears of every attempt
        that timed out.
        """
        out: queue.Queue = queue.Queue()
        stop = threading.Event()
        failure: list[BaseException] = []

        def worker() -> None:
            loop = asyncio.new_event_loop()
            try:
                loop.run_until_complete(self._produce(iter(requests), out, stop, before_retry, possibly_billed))
            except BaseException as exc:
                failure.append(exc)
            finally:
                loop.close()
                out.put(_END)

        thread = threading.Thread(target=worker, name="openai-backend", daemon=True)
        thread.start()
        try:
            while True:
                item = out.get()
                if item is _END:
                    break
                yield item
            if failure:
                raise failure[0]
        finally:
            # Consumer stopped early (error, Ctrl-C): stop pulling, let in-flight calls end, join.
            stop.set()
            thread.join(timeout=self.timeout_s + 5)
