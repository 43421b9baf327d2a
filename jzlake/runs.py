"""Per-run folder: stage summaries (JSON) and the curation report, under ``settings.runs_dir``.

Stages run in one process (``jzlake curate``) or as separate Airflow tasks; both write their
summary here under the shared run id, so the report can reconcile the whole run either way.
Paths may be local or object-store URIs (pyarrow's filesystem layer handles both; ``s3a://``
is mapped to pyarrow's ``s3://`` by ``jzlake.uris``).
"""

from __future__ import annotations

import json
import re
from typing import Any

from jzlake.settings import Settings
from jzlake.uris import arrow_filesystem


def safe_run_id(run_id: str) -> str:
    """Airflow run ids hold ``:`` and ``+``; keep a path-safe form."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", run_id)


def run_dir(settings: Settings, run_id: str) -> str:
    return f"{settings.runs_dir.rstrip('/')}/{safe_run_id(run_id)}"


def _fs(path: str) -> tuple[Any, str]:
    """``(pyarrow FileSystem, inner path)`` for a run-folder path or URI (``s3a://`` included)."""
    return arrow_filesystem(path)


def write_text(path: str, text: str) -> str:
    filesystem, inner = _fs(path)
    filesystem.create_dir(inner.rsplit("/", 1)[0], recursive=True)
    with filesystem.open_output_stream(inner) as out:
        out.write(text.encode("utf-8"))
    return path


def read_text(path: str) -> str | None:
    from pyarrow import fs

    filesystem, inner = _fs(path)
    if filesystem.get_file_info(inner).type != fs.FileType.File:
        return None
    with filesystem.open_input_stream(inner) as stream:
        return stream.read().decode("utf-8")


def write_stage_summary(settings: Settings, run_id: str, stage: str, summary: dict[str, Any]) -> str:
    path = f"{run_dir(settings, run_id)}/{stage}.summary.json"
    return write_text(path, json.dumps(summary, sort_keys=True, indent=2, default=str))


def read_stage_summary(settings: Settings, run_id: str, stage: str) -> dict[str, Any] | None:
    text = read_text(f"{run_dir(settings, run_id)}/{stage}.summary.json")
    return json.loads(text) if text else None
