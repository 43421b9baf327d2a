"""``jzlake influence`` and ``python -m models.influence``: LESS selection from the command line.

    jzlake influence                                   # prepare → every shard → commit, one process
    jzlake influence --top-k 500                       # or --top-fraction 0.05 (the default)
    jzlake influence --phase prepare --run-name R      # the DAG's steps: prepare once,
    jzlake influence --phase score --run-name R --shard-index 3 --num-shards 8   # each shard,
    jzlake influence --phase commit --run-name R --num-shards 8                   # then commit

``--run-name`` is an alias (the Airflow run id) that prepare records for the content-addressed
influence run id; later phases resolve it, so no task needs another's XCom. The last stdout line
is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jzlake.lineage import stable_hash
from jzlake.settings import InfluenceSettings, Settings

# flag destination -> InfluenceSettings field
OVERRIDES = {
    "model": "model", "candidate_unit": "candidate_unit", "pairs_table": "pairs_table",
    "pairs_path": "pairs_path", "projection_dim": "projection_dim", "max_seq_len": "max_seq_len",
    "warmup_epochs": "warmup_epochs", "warmup_fraction": "warmup_fraction",
    "targets_per_subtask": "targets_per_subtask", "grad_chunk_size": "grad_chunk_size",
    "gradient_method": "gradient_method", "torch_threads": "torch_threads", "device": "device",
    "num_shards": "num_shards", "top_k": "top_k", "top_fraction": "top_fraction",
}


def configure(parser: argparse.ArgumentParser) -> None:
    """The stage's flags (``jzlake`` adds ``--config`` and ``--lake-root``)."""
    parser.add_argument("--phase", choices=("all", "prepare", "score", "commit"), default="all")
    parser.add_argument("--run-id", help="influence run id (printed by prepare)")
    parser.add_argument("--run-name", help="alias recorded by prepare (e.g. the Airflow run id)")
    parser.add_argument("--input-version", type=int, help="pin the input table version (default: latest)")
    parser.add_argument("--shard-index", type=int, help="score only this shard")
    parser.add_argument("--num-shards", type=int, help="number of score shards (default: settings)")
    selection = parser.add_mutually_exclusive_group()
    selection.add_argument("--top-k", type=int, help="select the k best documents")
    selection.add_argument("--top-fraction", type=float, help="select this fraction (default 0.05)")
    parser.add_argument("--model", help="HF model directory or MLflow models:/ URI (default: tiny model)")
    parser.add_argument("--candidate-unit", choices=("excerpt", "pair"))
    parser.add_argument("--pairs-table", help="catalogued table of (doc_id, prompt, completion) pairs")
    parser.add_argument("--pairs-path", help="Parquet/JSONL file of (doc_id, prompt, completion) pairs")
    parser.add_argument("--projection-dim", type=int)
    parser.add_argument("--max-seq-len", type=int)
    parser.add_argument("--warmup-epochs", type=int)
    parser.add_argument("--warmup-fraction", type=float)
    parser.add_argument("--targets-per-subtask", type=int)
    parser.add_argument("--grad-chunk-size", type=int)
    parser.add_argument("--gradient-method", choices=("factored", "vmap"))
    parser.add_argument("--torch-threads", type=int)
    parser.add_argument("--device", help="cpu, cuda, cuda:1 or auto")
    parser.add_argument("--force", action="store_true", help="rescore shards that already staged rows")
    parser.add_argument("--no-mlflow", action="store_true", help="skip MLflow logging in the commit")


def influence_config(args: argparse.Namespace, settings: Settings) -> InfluenceSettings:
    """``settings.influence`` with the flags given on the command line applied."""
    update = {field: getattr(args, dest) for dest, field in OVERRIDES.items()
              if getattr(args, dest, None) is not None}
    if update.get("top_k") is not None:
        update["top_fraction"] = None
    return InfluenceSettings.model_validate({**settings.influence.model_dump(), **update})


def _alias_path(settings: Settings, name: str) -> Path:
    return Path(settings.runs_dir) / "influence" / "names" / f"{stable_hash(name, length=24)}.json"


def record_alias(settings: Settings, name: str, run_id: str) -> None:
    path = _alias_path(settings, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"name": name, "run_id": run_id}))


def resolve_run_id(args: argparse.Namespace, settings: Settings) -> str:
    if args.run_id:
        return args.run_id
    if args.run_name:
        path = _alias_path(settings, args.run_name)
        if not path.is_file():
            raise SystemExit(f"no influence run is recorded under --run-name {args.run_name!r}: run "
                             "`--phase prepare` with that name first")
        return json.loads(path.read_text())["run_id"]
    raise SystemExit(f"--phase {args.phase} needs --run-id or --run-name (from the prepare phase)")


def run(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    """Run the requested phase(s); returns the JSON summary."""
    from models.influence import job

    config = influence_config(args, settings)
    shards = config.num_shards
    if args.shard_index is not None and not 0 <= args.shard_index < shards:
        raise SystemExit(f"--shard-index {args.shard_index} is outside 0..{shards - 1} (--num-shards {shards})")
    if args.phase == "all":
        summary = job.run_all(settings, config, input_version=args.input_version, shard_index=args.shard_index,
                              force=args.force, log_mlflow=not args.no_mlflow)
        if args.run_name:
            record_alias(settings, args.run_name, summary["run_id"])
        return summary
    if args.phase == "prepare":
        manifest = job.prepare(settings, config, args.input_version)
        if args.run_name:
            record_alias(settings, args.run_name, manifest["run_id"])
        return {key: manifest[key] for key in (
            "run_id", "input_table", "input_version", "model", "candidate_unit", "documents", "units",
            "skipped", "warmup_examples", "checkpoint_weights", "subtasks", "reused")}
    run_id = resolve_run_id(args, settings)
    if args.phase == "score":
        indices = range(shards) if args.shard_index is None else [args.shard_index]
        return {"run_id": run_id, "shards": [job.score_shard(settings, config, run_id, i, shards, force=args.force)
                                             for i in indices]}
    return job.commit(settings, config, run_id, shards, log_mlflow=not args.no_mlflow)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m models.influence [flags]`` (same flags as ``jzlake influence``)."""
    from jzlake.cli import settings_from_args

    parser = argparse.ArgumentParser(prog="python -m models.influence", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML settings file (default: packaged defaults)")
    parser.add_argument("--lake-root", help="lake root URI or path (overrides the config)")
    configure(parser)
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    summary = run(args, settings_from_args(args))
    print(json.dumps(summary, sort_keys=True, default=str), flush=True)
    return 0
