"""``jzlake <stage>``: every stage outside Airflow. Each prints one JSON summary as its last line.

A stage module exposes ``configure(parser)`` (its own flags) and ``run(args, settings) -> dict``.
Modules are imported only when their subcommand runs, so ``jzlake --help`` needs no Spark/torch.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from typing import Any

from jzlake.settings import Settings, load_settings

# subcommand -> (module, one-line help). Later stages add a line here.
COMMANDS: dict[str, tuple[str, str]] = {
    "curate": ("spark_jobs.curate", "ingest → clean → dedupe → decontaminate → report"),
    "tables": ("jzlake.tables", "list every catalogued table with its Delta version and row count"),
}


def parse_key_values(pairs: Sequence[str] | None, flag: str) -> dict[str, str]:
    """``["a=x", "b=y"]`` → ``{"a": "x", "b": "y"}`` with a clear error on a malformed pair."""
    result: dict[str, str] = {}
    for pair in pairs or []:
        name, sep, value = pair.partition("=")
        if not sep or not name or not value:
            raise SystemExit(f"{flag} expects NAME=VALUE, got {pair!r}")
        result[name] = value
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jzlake", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text)
        cmd.add_argument("--config", help="YAML settings file (default: packaged defaults)")
        cmd.add_argument("--lake-root", help="lake root URI or path (overrides the config)")
        cmd.set_defaults(_module=module)
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    if getattr(args, "lake_root", None):
        overrides["lake"] = {"root": args.lake_root}
    return load_settings(args.config, overrides=overrides)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # Let the chosen stage add its own flags before the full parse.
    known, _ = parser.parse_known_args(argv) if argv and argv[0] in COMMANDS else (None, None)
    if known is not None:
        module = importlib.import_module(known._module)
        stage_parser = parser._subparsers._group_actions[0].choices[known.command]  # type: ignore[union-attr]
        module.configure(stage_parser)
    args = parser.parse_args(argv)
    module = importlib.import_module(args._module)
    summary = module.run(args, settings_from_args(args))
    print(json.dumps(summary, sort_keys=True, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
