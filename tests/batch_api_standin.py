"""STAND-IN for the OpenAI Files + Batches API, for tests only — not OpenAI, not a product.

Implements just what ``models.generation.backends.openai_batch`` uses, with OpenAI's shapes:

* ``POST /v1/files`` (multipart ``file`` + ``purpose``), ``GET /v1/files/{id}``,
  ``GET /v1/files/{id}/content``;
* ``POST /v1/batches``, ``GET /v1/batches/{id}``, ``GET /v1/batches`` (newest first, ``after`` /
  ``limit`` cursor), ``POST /v1/batches/{id}/cancel``.

A created batch runs in the background against a real OpenAI-compatible server (the local
``transformers serve``): each JSONL line's ``body`` is POSTed to ``upstream + url``; answers go
to the output file (``{"custom_id", "response": {"status_code", "body"}}``), failures to the
error file. Status goes ``validating → in_progress → finalizing → completed`` (``start_delay_s``
keeps a batch in ``validating`` for a while, so a client can "crash" mid-poll).
``fail_custom_ids`` makes chosen lines fail with a 500 line in the error file.
Whole-batch endings, as OpenAI reports them: ``fail_batches=N`` — the first N batches fail
validation (status ``failed``, ``errors`` filled, no output or error file, nothing executed);
``expire_batches=N`` with ``expire_after=K`` — the first N batches run K lines, then end
``expired`` with every other line in the error file as ``batch_expired``. A cancel during
``validating`` ends the batch ``cancelled`` before any line runs; during ``in_progress`` the
lines still running finish and the batch ends ``cancelled`` with what they produced.

Counters (``files_uploaded``, ``batches_created``, ``executed`` per custom_id) let tests prove
that a resumed client neither uploaded nor created anything twice.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from collections import Counter
from typing import Any

from tests.fault_proxy import ThreadedServer

ENDPOINTS = ("/v1/chat/completions",)


class BatchApiStandIn:
    """In-process stand-in server; ``url`` is the base URL to give the OpenAI SDK."""

    def __init__(self, upstream_root: str, port: int, *, start_delay_s: float = 0.0, concurrency: int = 4,
                 fail_custom_ids: set[str] | None = None, fail_batches: int = 0, expire_batches: int = 0,
                 expire_after: int = 0) -> None:
        self.upstream_root = upstream_root.rstrip("/")
        self.port = port
        self.start_delay_s = start_delay_s
        self.concurrency = concurrency
        self.fail_custom_ids = set(fail_custom_ids or ())
        self.fail_batches = fail_batches
        self.expire_batches = expire_batches
        self.expire_after = expire_after
        self.files: dict[str, dict[str, Any]] = {}
        self.file_data: dict[str, bytes] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self.executed: Counter[str] = Counter()
        self.log: list[str] = []  # what happened, in order (printed by failing tests)
        self.files_uploaded = 0
        self.batches_created = 0
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._server = ThreadedServer(self._app(), port)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> BatchApiStandIn:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop()

    def __enter__(self) -> BatchApiStandIn:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}-standin-{next(self._ids):05d}"

    def _store_file(self, data: bytes, filename: str, purpose: str) -> dict[str, Any]:
        file_id = self._new_id("file")
        meta = {"id": file_id, "object": "file", "bytes": len(data), "created_at": int(time.time()),
                "filename": filename, "purpose": purpose, "status": "processed"}
        self.files[file_id] = meta
        self.file_data[file_id] = data
        return meta

    # ---- batch execution ----------------------------------------------------------------------

    async def _run_batch(self, batch_id: str, client: Any) -> None:
        try:
            await self._execute(batch_id, client)
        except Exception as exc:  # a stand-in bug must not look like a batch that never ends
            self.log.append(f"{batch_id} failed: {type(exc).__name__}: {exc}")
            self.batches[batch_id].update(status="failed", failed_at=int(time.time()), errors={
                "object": "list", "data": [{"code": "standin_error", "message": f"{type(exc).__name__}: {exc}"}]})

    async def _execute(self, batch_id: str, client: Any) -> None:
        batch = self.batches[batch_id]
        await asyncio.sleep(self.start_delay_s)
        if batch["status"] == "cancelling":
            batch.update(status="cancelled", cancelled_at=int(time.time()))
            return
        lines = [json.loads(line) for line in self.file_data[batch["input_file_id"]].decode().splitlines()
                 if line.strip()]
        with self._lock:
            fails, self.fail_batches = self.fail_batches > 0, max(0, self.fail_batches - 1)
            expires, self.expire_batches = self.expire_batches > 0, max(0, self.expire_batches - 1)
        if fails:  # validation failed: nothing runs, no files (OpenAI does not bill it)
            self.log.append(f"{batch_id} failed validation (injected)")
            batch.update(status="failed", failed_at=int(time.time()), errors={"object": "list", "data": [
                {"code": "invalid_request", "message": "injected: the batch failed validation (stand-in)",
                 "param": None, "line": None}]})
            return
        batch.update(status="in_progress", in_progress_at=int(time.time()))
        batch["request_counts"]["total"] = len(lines)
        outputs: list[str] = []
        errors: list[str] = []
        slots = asyncio.Semaphore(self.concurrency)

        async def one(number: int, line: dict[str, Any]) -> None:
            custom_id = line["custom_id"]
            async with slots:
                if expires and number >= self.expire_after:
                    self.log.append(f"{batch_id} line {number} expired")
                    record = {"id": f"batch_req_{batch_id}_{number}", "custom_id": custom_id, "response": None,
                              "error": {"code": "batch_expired", "message": "This request could not be executed "
                                        "before the completion window expired."}}
                    errors.append(json.dumps(record))
                    batch["request_counts"]["failed"] += 1
                    return
                if custom_id in self.fail_custom_ids:
                    status, body = 500, {"error": {"message": "injected failure for this line (stand-in)"}}
                else:
                    with self._lock:
                        self.executed[custom_id] += 1
                    self.log.append(f"{batch_id} line {number} -> upstream")
                    try:
                        answer = await client.post(f"{self.upstream_root}{line['url']}", json=line["body"])
                        status, body = answer.status_code, answer.json()
                    except Exception as exc:  # the line fails, like a real batch line would
                        status, body = 500, {"error": {"message": f"{type(exc).__name__}: {exc} (stand-in)"}}
                    self.log.append(f"{batch_id} line {number} <- {status}")
            record = {"id": f"batch_req_{batch_id}_{number}", "custom_id": custom_id,
                      "response": {"status_code": status, "request_id": f"req_{number}", "body": body},
                      "error": None}
            (outputs if status == 200 else errors).append(json.dumps(record))
            batch["request_counts"]["completed" if status == 200 else "failed"] += 1

        await asyncio.gather(*(one(n, line) for n, line in enumerate(lines)))
        if batch["status"] != "cancelling":
            batch.update(status="finalizing", finalizing_at=int(time.time()))
        if outputs:
            batch["output_file_id"] = self._store_file(("\n".join(outputs) + "\n").encode(),
                                                       f"{batch_id}_output.jsonl", "batch_output")["id"]
        if errors:
            batch["error_file_id"] = self._store_file(("\n".join(errors) + "\n").encode(),
                                                      f"{batch_id}_error.jsonl", "batch_output")["id"]
        if expires:
            batch.update(status="expired", expired_at=int(time.time()))
        elif batch["status"] == "cancelling":
            batch.update(status="cancelled", cancelled_at=int(time.time()))
        else:
            batch.update(status="completed", completed_at=int(time.time()))

    # ---- HTTP ----------------------------------------------------------------------------------

    def _app(self) -> Any:
        import httpx
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import JSONResponse, Response
        from starlette.routing import Route

        client = httpx.AsyncClient(timeout=httpx.Timeout(60.0))
        tasks: set[asyncio.Task] = set()

        def not_found(what: str) -> JSONResponse:
            return JSONResponse({"error": {"message": f"No such {what} (stand-in)", "type": "invalid_request_error"}},
                                status_code=404)

        async def upload(request: Request) -> Response:
            form = await request.form()
            upload = form.get("file")
            purpose = str(form.get("purpose") or "")
            if upload is None or isinstance(upload, str) or purpose != "batch":
                return JSONResponse({"error": {"message": "need a file and purpose=batch (stand-in)"}},
                                    status_code=400)
            data = await upload.read()
            with self._lock:
                self.files_uploaded += 1
                meta = self._store_file(data, upload.filename or "upload.jsonl", purpose)
            return JSONResponse(meta)

        async def file_meta(request: Request) -> Response:
            meta = self.files.get(request.path_params["file_id"])
            return JSONResponse(meta) if meta else not_found("file")

        async def file_content(request: Request) -> Response:
            data = self.file_data.get(request.path_params["file_id"])
            return Response(data, media_type="application/octet-stream") if data is not None else not_found("file")

        async def create_batch(request: Request) -> Response:
            params = await request.json()
            if params.get("input_file_id") not in self.files:
                return not_found("file")
            if params.get("endpoint") not in ENDPOINTS:
                return JSONResponse({"error": {"message": f"endpoint must be one of {ENDPOINTS} (stand-in)"}},
                                    status_code=400)
            with self._lock:
                self.batches_created += 1
                batch_id = self._new_id("batch")
            batch = {"id": batch_id, "object": "batch", "endpoint": params["endpoint"],
                     "input_file_id": params["input_file_id"],
                     "completion_window": params.get("completion_window", "24h"), "status": "validating",
                     "created_at": int(time.time()), "metadata": params.get("metadata"),
                     "output_file_id": None, "error_file_id": None,
                     "request_counts": {"total": 0, "completed": 0, "failed": 0}}
            self.batches[batch_id] = batch
            self.log.append(f"{batch_id} created over {params['input_file_id']}")
            task = asyncio.get_running_loop().create_task(self._run_batch(batch_id, client))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            return JSONResponse(batch)

        async def get_batch(request: Request) -> Response:
            batch = self.batches.get(request.path_params["batch_id"])
            return JSONResponse(batch) if batch else not_found("batch")

        async def list_batches(request: Request) -> Response:
            ordered = sorted(self.batches.values(), key=lambda b: b["id"], reverse=True)
            after = request.query_params.get("after")
            if after:
                ids = [b["id"] for b in ordered]
                ordered = ordered[ids.index(after) + 1:] if after in ids else []
            limit = int(request.query_params.get("limit", 20))
            page = ordered[:limit]
            return JSONResponse({"object": "list", "data": page, "has_more": len(ordered) > limit,
                                 "first_id": page[0]["id"] if page else None,
                                 "last_id": page[-1]["id"] if page else None})

        async def cancel_batch(request: Request) -> Response:
            batch = self.batches.get(request.path_params["batch_id"])
            if not batch:
                return not_found("batch")
            if batch["status"] in ("validating", "in_progress"):
                batch["status"] = "cancelling"
            return JSONResponse(batch)

        routes = [
            Route("/v1/files", upload, methods=["POST"]),
            Route("/v1/files/{file_id}", file_meta, methods=["GET"]),
            Route("/v1/files/{file_id}/content", file_content, methods=["GET"]),
            Route("/v1/batches", create_batch, methods=["POST"]),
            Route("/v1/batches", list_batches, methods=["GET"]),
            Route("/v1/batches/{batch_id}", get_batch, methods=["GET"]),
            Route("/v1/batches/{batch_id}/cancel", cancel_batch, methods=["POST"]),
        ]
        return Starlette(routes=routes)
