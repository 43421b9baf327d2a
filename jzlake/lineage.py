"""Run ids and lineage helpers shared by every stage."""

from __future__ import annotations

import hashlib
import json
import uuid
from datetime import UTC, datetime
from typing import Any


def new_run_id(stage: str, now: datetime | None = None) -> str:
    """``<stage>-<UTC timestamp>-<8 hex>``: sortable, unique, says what produced the row."""
    now = now or datetime.now(UTC)
    return f"{stage}-{now.strftime('%Y%m%dT%H%M%SZ')}-{uuid.uuid4().hex[:8]}"


def utc_now() -> datetime:
    return datetime.now(UTC)


def stable_hash(*parts: Any, length: int = 32) -> str:
    """Content-addressed key: sha256 over the JSON encoding of ``parts`` (order matters)."""
    payload = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:length]


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
