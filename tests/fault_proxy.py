"""A fault-injecting (and request-counting) HTTP proxy in front of the local LLM server.

Test support, not production code. It forwards everything to ``upstream`` and, following a
seeded schedule, answers some chat-completion requests itself instead:

``429``      rate limited, with ``Retry-After`` (seconds) — the client must wait that long;
``500``      server error, not forwarded;
``timeout``  holds the request longer than the client's timeout, not forwarded;
``lost``     forwarded (the server does the work), but the client gets a 502 — the answer is lost;
``401``      authentication error echoing the ``Authorization`` header (tests key redaction);
``400``      bad request, not retryable (the key fails for this run).

Every request is counted per ledger key (header ``X-JZLake-Request-Key``): arrivals, faults and
how many reached the server (``forwarded``) — which is what "the server saw no repeated request
for a succeeded key" is checked against. ``delay_s`` adds latency to forwarded requests so a
test can kill a client mid-run.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

KEY_HEADER = "x-jzlake-request-key"
FAULTS = ("429", "500", "timeout", "lost", "401", "400")


def free_port(start: int, end: int) -> int:
    """First port in ``[start, end]`` nothing listens on (our assigned range only)."""
    from tests.airflow_env import free_port as first_free

    return first_free(range(start, end + 1))


class ThreadedServer:
    """An ASGI app served by uvicorn in a daemon thread of the test process."""

    def __init__(self, app: Any, port: int) -> None:
        import uvicorn

        self.port = port
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off",
                                timeout_graceful_shutdown=1)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name=f"asgi-{port}", daemon=True)

    def start(self, timeout_s: float = 20.0) -> None:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError(f"test server on port {self.port} did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)


@dataclass
class FaultSchedule:
    """Which fault (or ``ok``) each chat-completion request gets; deterministic for a seed.

    ``script`` is consumed first (one entry per request, in arrival order); afterwards each
    request draws from the rates. A key never gets more than ``max_faults_per_key`` faults, so
    a client with enough retries always gets through.
    """

    seed: int = 0
    rates: dict[str, float] = field(default_factory=dict)
    script: list[str] = field(default_factory=list)
    per_key: dict[str, list[str]] = field(default_factory=dict)  # key -> faults for its first requests
    retry_after: str = "1"
    hang_s: float = 5.0
    max_faults_per_key: int = 2

    def __post_init__(self) -> None:
        unknown = {*self.rates, *self.script, *(f for fs in self.per_key.values() for f in fs)} - {*FAULTS, "ok"}
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; use {FAULTS}")
        self._rng = random.Random(self.seed)
        self._script = list(self.script)
        self._lock = threading.Lock()

    def decide(self, key: str | None, faults_so_far: int, nth_for_key: int) -> str:
        with self._lock:
            if key is not None and key in self.per_key and nth_for_key < len(self.per_key[key]):
                return self.per_key[key][nth_for_key]
            if faults_so_far >= self.max_faults_per_key:
                return "ok"
            if self._script:
                return self._script.pop(0)
            draw = self._rng.random()
            for kind, rate in sorted(self.rates.items()):
                if draw < rate:
                    return kind
                draw -= rate
            return "ok"


@dataclass
class Event:
    key: str | None
    kind: str
    at: float


class FaultProxy:
    """Counting/fault-injecting reverse proxy; ``url`` is the OpenAI base URL to give clients."""

    def __init__(self, upstream_root: str, port: int, schedule: FaultSchedule | None = None,
                 delay_s: float = 0.0) -> None:
        self.upstream_root = upstream_root.rstrip("/")
        self.port = port
        self.schedule = schedule or FaultSchedule()
        self.delay_s = delay_s
        self.arrived: Counter[str] = Counter()
        self.forwarded: Counter[str] = Counter()
        self.succeeded_upstream: Counter[str] = Counter()
        self.faults: Counter[str] = Counter()
        self.faults_by_key: dict[str, Counter[str]] = defaultdict(Counter)
        self.events: list[Event] = []
        self.auth_headers: set[str] = set()
        self._lock = threading.Lock()
        self._server = ThreadedServer(self._app(), port)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> FaultProxy:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def events_for(self, key: str) -> list[Event]:
        with self._lock:
            return [e for e in self.events if e.key == key]

    def _note(self, key: str | None, kind: str) -> None:
        with self._lock:
            self.events.append(Event(key, kind, time.monotonic()))
            if kind in FAULTS:
                self.faults[kind] += 1
                if key:
                    self.faults_by_key[key][kind] += 1

    def _app(self) -> Any:
        import httpx
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import JSONResponse, Response
        from starlette.routing import Route

        client = httpx.AsyncClient(timeout=httpx.Timeout(300.0))

        async def forward(request: Request, body: bytes) -> Response:
            headers = {k: v for k, v in request.headers.items()
                       if k.lower() in ("content-type", "authorization", "accept", KEY_HEADER)}
            upstream = await client.request(request.method, f"{self.upstream_root}{request.url.path}",
                                            params=dict(request.query_params), content=body, headers=headers)
            return Response(upstream.content, status_code=upstream.status_code,
                            media_type=upstream.headers.get("content-type"))

        async def handle(request: Request) -> Response:
            body = await request.body()
            if request.method != "POST" or not request.url.path.endswith("/chat/completions"):
                return await forward(request, body)
            key = request.headers.get(KEY_HEADER)
            with self._lock:
                nth = self.arrived[key or ""]
                self.arrived[key or ""] += 1
                if "authorization" in request.headers:
                    self.auth_headers.add(request.headers["authorization"])
                faults = sum(self.faults_by_key[key].values()) if key else 0
            kind = self.schedule.decide(key, faults, nth)
            self._note(key, kind if kind in FAULTS else "arrived")
            if kind == "429":
                return JSONResponse({"error": {"message": "rate limited (injected)", "type": "rate_limit"}},
                                    status_code=429, headers={"Retry-After": self.schedule.retry_after})
            if kind == "500":
                return JSONResponse({"error": {"message": "server error (injected)"}}, status_code=500)
            if kind == "400":
                return JSONResponse({"error": {"message": "bad request (injected)"}}, status_code=400)
            if kind == "401":
                echoed = request.headers.get("authorization", "")
                return JSONResponse({"error": {"message": f"Incorrect API key provided: {echoed} (injected)"}},
                                    status_code=401)
            if kind == "timeout":
                await asyncio.sleep(self.schedule.hang_s)
                return JSONResponse({"error": {"message": "gateway timeout (injected)"}}, status_code=504)
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            with self._lock:
                self.forwarded[key or ""] += 1
            response = await forward(request, body)
            if kind == "lost":
                return JSONResponse({"error": {"message": "bad gateway: answer lost (injected)"}}, status_code=502)
            if response.status_code == 200:
                with self._lock:
                    self.succeeded_upstream[key or ""] += 1
                self._note(key, "ok")
            return response

        routes = [Route("/{path:path}", handle, methods=["GET", "POST", "DELETE"])]
        return Starlette(routes=routes)
