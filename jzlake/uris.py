"""Lake and source URIs for the non-JVM readers (pyarrow, deltalake).

Spark reaches S3 through Hadoop's ``s3a://`` connector (``s3n://`` in old configs), so that is
what a lake root or source glob says. pyarrow's ``FileSystem.from_uri`` rejects those schemes
("Unrecognized filesystem type in URI") and delta-rs documents ``s3://``: every place that
hands a lake or source URI to pyarrow or deltalake goes through ``arrow_uri`` first. The
original spelling stays in settings, table rows and messages.
"""

from __future__ import annotations

import os
from typing import Any

from jzlake.settings import is_uri

# Hadoop's S3 connector schemes → the one pyarrow and delta-rs know.
S3_ALIASES = frozenset({"s3a", "s3n"})


def arrow_uri(uri: str) -> str:
    """``s3a://b/k`` and ``s3n://b/k`` → ``s3://b/k``; every other value unchanged."""
    scheme, sep, rest = uri.partition("://")
    if sep and scheme.lower() in S3_ALIASES:
        return f"s3://{rest}"
    return uri


def delta_dataset(delta: Any, **kwargs: Any) -> Any:
    """A pyarrow dataset over a deltalake ``DeltaTable``, read through Arrow's own filesystem.

    ``DeltaTable.to_pyarrow_dataset()`` reads through a Python-implemented filesystem: Arrow's
    readahead tasks finishing after a scan then drop Python objects on Arrow's pool threads, and
    a process that exits right after a read can abort in interpreter teardown ("terminate called
    without an active exception"; apache/arrow#34314, delta-rs#2184). With a native filesystem
    rooted at the table no file handle needs the GIL. ``kwargs`` go to ``to_pyarrow_dataset``.
    """
    from pyarrow import fs as pafs

    filesystem, root = arrow_filesystem(delta.table_uri)
    return delta.to_pyarrow_dataset(filesystem=pafs.SubTreeFileSystem(root, filesystem), **kwargs)


def delta_table(delta: Any, columns: list[str] | None = None, row_filter: Any = None) -> Any:
    """The rows of a deltalake ``DeltaTable`` as a pyarrow Table (see ``delta_dataset``)."""
    return delta_dataset(delta).to_table(columns=columns, filter=row_filter)


def arrow_filesystem(path: str) -> tuple[Any, str]:
    """``(pyarrow FileSystem, path inside it)`` for a local path (relative ones too) or a URI.

    A plain ``s3://bucket/key`` (after ``arrow_uri``) gets ``S3FileSystem()``: region,
    credentials and endpoint come from the standard AWS chain (``AWS_REGION``/``AWS_DEFAULT_REGION``,
    ``AWS_ENDPOINT_URL``, ``~/.aws``, instance metadata), as for deltalake. ``from_uri`` would
    instead look the bucket's region up with a HeadBucket call on every open, which fails on
    S3-compatible stores. A URI with ``?options`` keeps ``from_uri`` (its options are honoured).
    """
    from pyarrow import fs as pafs

    if not is_uri(path):
        return pafs.LocalFileSystem(), os.path.abspath(path)
    uri = arrow_uri(path)
    if uri.startswith("s3://") and "?" not in uri:
        return pafs.S3FileSystem(), uri[len("s3://"):].rstrip("/")
    return pafs.FileSystem.from_uri(uri)
