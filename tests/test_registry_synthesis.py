"""Which synthesizer ``jzlake synthesize`` uses (``models/synthesize.py``) given the registry:
``@champion`` first, ``@challenger`` only when allowed, a clear error otherwise, ``--model`` wins;
the resolved version (never the alias) goes into the lineage and the content-addressed run id."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from jzlake.settings import Settings
from models import registry
from models.synthesize import content_run_id, resolve_synthesizer
from tests.conftest import make_settings
from tests.llm_fixtures import tiny_model_dir  # noqa: F401

pytestmark = pytest.mark.mlflow
NAME = "jiuzhang-synthesizer"


def _settings(tmp_path: Path, **synthesis: object) -> Settings:
    return make_settings(tmp_path, home=str(tmp_path), synthesis=synthesis,
                         models={"cache_dir": str(tmp_path / "cache")},
                         mlflow={"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
                                 "artifact_root": str(tmp_path / "artifacts")})


def _register(settings: Settings, model_dir: Path, tag: str) -> registry.RegisteredModel:
    with registry.start_run(settings, f"train {tag}", tag) as run:
        pass
    return registry.register_model(settings, name=NAME, model_dir=model_dir, run_id=run.info.run_id,
                                   tags={registry.TRAINING_KEY_TAG: tag})


def test_registry_resolution_order(tmp_path: Path, tiny_model_dir: Path) -> None:  # noqa: F811
    settings = _settings(tmp_path, allow_challenger=True)
    with pytest.raises(LookupError, match="jzlake train synthesizer"):
        resolve_synthesizer(settings)

    source = tmp_path / "out"
    shutil.copytree(tiny_model_dir, source, ignore=shutil.ignore_patterns(".*"))
    first = _register(settings, source, "a")
    challenger = resolve_synthesizer(settings)
    assert (challenger.model_uri, challenger.model_version) == (f"models:/{NAME}/1", "1")
    served = Path(challenger.served_models[settings.generation.synthesizer_model])
    assert (served / "config.json").is_file() and registry.MANIFEST_FILE in {p.name for p in served.iterdir()}

    fail_closed = _settings(tmp_path, allow_challenger=False)
    with pytest.raises(LookupError, match="allow_challenger is off"):
        resolve_synthesizer(fail_closed)

    (source / "generation_config.json").write_text("{}")
    second = _register(settings, source, "b")  # challenger moves to v2
    registry.set_alias(settings, NAME, "champion", first.version)
    champion = resolve_synthesizer(fail_closed)  # a champion needs no permission
    assert champion.model_uri == f"models:/{NAME}/1" == resolve_synthesizer(settings).model_uri
    run_v1 = content_run_id(settings, champion, 0, 1)
    registry.set_alias(settings, NAME, "champion", second.version)
    moved = resolve_synthesizer(settings)
    assert (moved.model_uri, moved.model_version) == (f"models:/{NAME}/2", "2")
    assert content_run_id(settings, moved, 0, 1) != run_v1  # a moved alias is a new synthesis run

    # An explicit model always wins over the registry.
    explicit = resolve_synthesizer(_settings(tmp_path, model=str(tiny_model_dir)))
    assert explicit.model_uri == f"file://{tiny_model_dir.resolve()}"
    pinned = resolve_synthesizer(_settings(tmp_path, model=f"models:/{NAME}/1"))
    assert pinned.model_uri == f"models:/{NAME}/1"


def test_a_corrupted_registered_synthesizer_is_refused(tmp_path: Path, tiny_model_dir: Path) -> None:  # noqa: F811
    settings = _settings(tmp_path, allow_challenger=True)
    source = tmp_path / "out"
    shutil.copytree(tiny_model_dir, source, ignore=shutil.ignore_patterns(".*"))
    with registry.start_run(settings, "train", "k") as run:
        pass
    registry.register_model(settings, name=NAME, model_dir=source, run_id=run.info.run_id, tags={},
                            by_reference=True)
    weights = source / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(registry.ModelIntegrityError, match=r"model\.safetensors"):
        resolve_synthesizer(settings)
