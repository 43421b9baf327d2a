"""Settings precedence and the table catalogue (pure, no Spark)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest
from pydantic import ValidationError

from jzlake import catalogue
from jzlake.cli import parse_key_values
from jzlake.settings import load_settings
from spark_jobs.curate import with_cli_inputs


def test_precedence_defaults_file_env_overrides(tmp_path: Path) -> None:
    config = tmp_path / "lake.yaml"
    config.write_text("lake: {root: s3a://bucket/lake}\nspark: {shuffle_partitions: 3}\n")
    env = {"JZLAKE__SPARK__SHUFFLE_PARTITIONS": "5", "SPARK_MASTER": "spark://h:7077"}
    settings = load_settings(config, overrides={"dedup": {"seed": 7}}, environ=env)
    assert settings.lake_root == "s3a://bucket/lake"
    assert settings.spark.shuffle_partitions == 5  # env beats the file
    assert settings.spark.master == "spark://h:7077"
    assert settings.dedup.seed == 7
    # The file replaced nothing it did not name: the default sources are all still there.
    assert set(settings.sources) == {"se_threads", "stackmathqa", "mathlm_stackexchange", "latex_books"}
    assert catalogue.table("gold.corpus").uri(settings) == "s3a://bucket/lake/gold/corpus"


def test_relative_paths_resolve_against_home(tmp_path: Path) -> None:
    settings = load_settings(overrides={"home": str(tmp_path)}, environ={})
    assert settings.lake_root == str(tmp_path / "var" / "lake")
    assert settings.path("/abs/x") == "/abs/x"


def test_bad_settings_fail_with_the_field_named(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="num_perm"):
        load_settings(overrides={"dedup": {"num_perm": 64, "bands": 16, "rows_per_band": 8}}, environ={})
    with pytest.raises(ValidationError, match="not_a_field"):
        load_settings(overrides={"clean": {"not_a_field": 1}}, environ={})
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ValueError, match="YAML mapping"):
        load_settings(bad, environ={})


def test_catalogue_schemas_agree_between_spark_and_arrow() -> None:
    for table in catalogue.all_tables():
        arrow = table.arrow_schema()
        assert arrow.names == table.column_names
        assert set(table.merge_keys) <= set(table.column_names), table.full_name
        assert "run_id" in table.column_names, f"{table.full_name} lacks lineage"
        if "metadata" in arrow.names:
            assert pa.types.is_map(arrow.field("metadata").type)
    with pytest.raises(KeyError, match="known tables"):
        catalogue.table("silver.nope")


def test_cli_inputs_replace_sources_and_add_benchmarks() -> None:
    settings = load_settings(environ={})
    updated = with_cli_inputs(settings, parse_key_values(["latex_books=/x/*.jsonl", "mine=/y/*.jsonl"], "--source"),
                              parse_key_values(["asdiv=/z/asdiv.json"], "--benchmark"))
    assert set(updated.sources) == {"latex_books", "mine"}
    assert updated.sources["latex_books"].mapping.markup == "latex"  # known name keeps its mapping
    assert updated.sources["mine"].mapping.text == ["text"]
    assert {"gsm8k", "math500", "svamp", "asdiv"} <= set(updated.benchmarks)
    with pytest.raises(SystemExit, match="NAME=VALUE"):
        parse_key_values(["oops"], "--source")


def test_command_line_paths_resolve_from_the_callers_directory(tmp_path: Path, monkeypatch) -> None:
    from jzlake.cli import build_parser, settings_from_args
    from spark_jobs.curate import settings_for

    config = tmp_path / "conf" / "lake.yaml"  # a config file's own relative values stay home-relative
    config.parent.mkdir()
    config.write_text("lake: {runs_dir: var/myruns}\n")
    caller = tmp_path / "elsewhere"
    caller.mkdir()
    monkeypatch.chdir(caller)
    args = build_parser("curate").parse_args([
        "curate", "--config", "../conf/lake.yaml", "--lake-root", "mylake",
        "--source", "x=mydata/*.jsonl", "--source", "remote=s3a://bucket/raw/**/*.jsonl",
        "--benchmark", "b=bench.jsonl"])
    settings = settings_for(args, settings_from_args(args))
    assert settings.lake_root == str(caller / "mylake")
    assert settings.path(settings.sources["x"].glob) == str(caller / "mydata" / "*.jsonl")
    assert settings.sources["remote"].glob == "s3a://bucket/raw/**/*.jsonl"  # URIs untouched
    assert settings.path(settings.benchmarks["b"].path) == str(caller / "bench.jsonl")
    home = Path(settings.home)
    assert home != caller and settings.runs_dir == str(home / "var" / "myruns")
    # Configured benchmarks (not named on the command line) still resolve against home.
    assert settings.path(settings.benchmarks["gsm8k"].path).startswith(str(home))
