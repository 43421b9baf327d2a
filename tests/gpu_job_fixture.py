"""A small real job for the GPU-dispatch tests, following the ``models/lake_io`` contract.

``python -m tests.gpu_job_fixture --mode ok --shard-index i --num-shards n --out DIR``: reads
``gold.corpus`` at a pinned version (no JVM), scores its shard of documents by word count, stages
the rows for ``gold.influence_scores`` (run ``fixture-run``), records its invocation in
``DIR/invocations.log`` and prints a JSON summary. ``--mode fail`` exits 3 after writing to stderr;
``--mode hang`` starts a child process and sleeps (for the timeout test, which kills both).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

RUN_ID = "fixture-run"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=("ok", "fail", "hang"), default="ok")
    parser.add_argument("--out", required=True)
    parser.add_argument("--input-version", type=int)
    parser.add_argument("--shard-index", type=int, default=0)
    parser.add_argument("--num-shards", type=int, default=1)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "invocations.log", "a") as log:
        log.write(f"{args.mode} {args.shard_index}/{args.num_shards}\n")
    print(f"shard {args.shard_index}/{args.num_shards} starting", flush=True)

    if args.mode == "fail":
        print("loading failed: corrupted checkpoint shard 7", file=sys.stderr, flush=True)
        return 3
    if args.mode == "hang":
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        (out / "pids.json").write_text(json.dumps({"child": child.pid}))
        time.sleep(600)
        return 0

    from jzlake.settings import load_settings
    from models import lake_io
    from models.influence.data import shard_documents

    settings = load_settings()  # the lake root arrives through the spec's env (JZLAKE__LAKE__ROOT)
    corpus, version = lake_io.read_table_at(settings, "gold.corpus", args.input_version, columns=["doc_id", "text"])
    docs = shard_documents(corpus.column("doc_id").to_pylist(), args.shard_index, args.num_shards)
    rows = [{"doc_id": r["doc_id"], "score": float(len(r["text"].split())), "run_id": RUN_ID,
             "input_table": "gold.corpus", "input_version": version, "shard_index": args.shard_index,
             "num_shards": args.num_shards} for r in corpus.to_pylist() if r["doc_id"] in docs]
    lake_io.stage_shard(settings, "gold.influence_scores", RUN_ID, args.shard_index, args.num_shards, rows)
    print(json.dumps({"shard_index": args.shard_index, "rows": len(rows), "input_version": version}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
