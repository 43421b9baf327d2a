"""Model registry (``models/registry.py``) on the default SQLite store and over HTTP against a real
``mlflow server``: artifact and by-reference storage, ``models:/`` resolution by version and
alias, sha256 verification on load (a flipped byte or a missing shard is refused naming the
file), idempotent registration by training key, alias moves."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from jzlake.settings import Settings
from models import registry
from tests.conftest import make_settings
from tests.llm_fixtures import tiny_model_dir  # noqa: F401
from tests.mlflow_server import MlflowServer, mlflow_server  # noqa: F401

pytestmark = pytest.mark.mlflow


@pytest.fixture(scope="module")
def sharded_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    """The tiny model saved in several safetensors shards (with the index), as large checkpoints are."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("sharded") / "model"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir).save_pretrained(out, max_shard_size="1MB")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) >= 2 and (out / "model.safetensors.index.json").is_file()
    return out


@pytest.fixture(params=["sqlite", "server"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    """Settings on a fresh SQLite store, or on the session's ``mlflow server`` (HTTP)."""
    cache = {"cache_dir": str(tmp_path / "model-cache")}
    if request.param == "sqlite":
        return make_settings(tmp_path, home=str(tmp_path), models=cache,
                             mlflow={"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
                                     "artifact_root": str(tmp_path / "artifacts")})
    server: MlflowServer = request.getfixturevalue("mlflow_server")
    return make_settings(tmp_path, home=str(tmp_path), models=cache, mlflow={"tracking_uri": server.url})


def _model_name(request: pytest.FixtureRequest, stem: str) -> str:
    """Unique per test and store: tests sharing the server never see each other's versions."""
    return f"{stem}-{request.node.name}".replace("[", "-").replace("]", "")


def _run_id(settings: Settings, key: str) -> str:
    with registry.start_run(settings, f"train {key}", key) as run:
        return run.info.run_id


def _copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(".*"))
    return target


def _flip_byte(path: Path, offset: int = 4096) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _logits(model_dir: Path) -> list[float]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return model(torch.tensor([[1, 5, 9, 13]])).logits[0, -1, :8].tolist()


def test_small_model_is_logged_as_artifacts_and_resolves_by_alias_and_version(
        store: Settings, tiny_model_dir: Path, tmp_path: Path, request: pytest.FixtureRequest) -> None:  # noqa: F811
    name = _model_name(request, "synth")
    source = _copy(tiny_model_dir, tmp_path / "job-output")
    run_id = _run_id(store, "small")
    model = registry.register_model(store, name=name, model_dir=source, run_id=run_id,
                                    tags={"jzlake.training_key": "k-small", "base_model": "tiny-llama"})
    assert (model.version, model.uri, model.run_id, model.aliases) == ("1", f"models:/{name}/1", run_id,
                                                                      ("challenger",))
    assert model.tags["jzlake.storage"] == "artifact" and model.tags["base_model"] == "tiny-llama"
    # The weights live in MLflow: deleting the job's folder changes nothing for consumers.
    shutil.rmtree(source)
    by_alias = registry.resolve_model_path(store, f"models:/{name}@challenger")
    by_version = registry.resolve_model_path(store, f"models:/{name}/1")
    assert by_alias == by_version and not (by_alias / "model.safetensors").is_symlink()
    assert registry.file_sha256(by_alias / "model.safetensors") == \
        registry.file_sha256(tiny_model_dir / "model.safetensors")
    assert _logits(by_alias) == pytest.approx(_logits(tiny_model_dir))


def test_large_model_is_registered_by_reference(store: Settings, sharded_model_dir: Path, tmp_path: Path,
                                                request: pytest.FixtureRequest) -> None:
    name = _model_name(request, "math")
    source = _copy(sharded_model_dir, tmp_path / "checkpoints" / "final")
    settings = store.model_copy(update={"mlflow": store.mlflow.model_copy(update={"artifact_max_bytes": 1024})})
    model = registry.register_model(settings, name=name, model_dir=source, run_id=_run_id(settings, "large"),
                                    tags={"jzlake.training_key": "k-large"})  # by_reference=None: decided by size
    assert model.tags["jzlake.storage"] == "reference"
    total = sum(p.stat().st_size for p in source.iterdir())
    assert int(model.tags["jzlake.model_bytes"]) == total
    # Only the manifest went to MLflow; it lists every file with its URI, size and sha256.
    cached = registry.resolve_model_path(settings, f"models:/{name}@challenger")
    manifest = json.loads((cached / registry.MANIFEST_FILE).read_text())
    assert manifest["storage"] == "reference"
    assert {e["path"] for e in manifest["files"]} == {p.name for p in source.iterdir()}
    for entry in manifest["files"]:
        assert entry["uri"] == (source / entry["path"]).as_uri()
        assert entry["size"] == (source / entry["path"]).stat().st_size
        assert entry["sha256"] == registry.file_sha256(source / entry["path"])
        assert (cached / entry["path"]).resolve() == (source / entry["path"]).resolve()  # not copied
    assert _logits(cached) == pytest.approx(_logits(sharded_model_dir))


def test_corrupted_or_missing_shard_is_refused_naming_the_file(store: Settings, sharded_model_dir: Path,
                                                               tmp_path: Path, request: pytest.FixtureRequest) -> None:
    name = _model_name(request, "shards")
    source = _copy(sharded_model_dir, tmp_path / "final")
    model = registry.register_model(store, name=name, model_dir=source, run_id=_run_id(store, "shards"),
                                    tags={}, by_reference=True)
    assert registry.resolve_model_path(store, model.uri).is_dir()
    shards = sorted(source.glob("model-*.safetensors"))
    _flip_byte(shards[1])
    with pytest.raises(registry.ModelIntegrityError, match=rf"{shards[1].name}.*sha256"):
        registry.resolve_model_path(store, model.uri)
    _flip_byte(shards[1])  # restored: loads again
    assert registry.resolve_model_path(store, f"models:/{name}@challenger").is_dir()
    shards[0].unlink()
    with pytest.raises(registry.ModelIntegrityError, match=rf"{shards[0].name}.*missing"):
        registry.resolve_model_path(store, f"models:/{name}@challenger")


def test_corrupted_artifact_copy_is_refused_and_a_damaged_cache_is_refetched(
        store: Settings, tiny_model_dir: Path, tmp_path: Path, request: pytest.FixtureRequest) -> None:  # noqa: F811
    name = _model_name(request, "artifact")
    model = registry.register_model(store, name=name, model_dir=_copy(tiny_model_dir, tmp_path / "out"),
                                    run_id=_run_id(store, "artifact"), tags={}, by_reference=False)
    cached = registry.resolve_model_path(store, model.uri)
    _flip_byte(cached / "model.safetensors")  # the local cache copy rots: fetched again from MLflow
    assert registry.resolve_model_path(store, model.uri) == cached
    original = registry.file_sha256(tiny_model_dir / "model.safetensors")
    assert registry.file_sha256(cached / "model.safetensors") == original
    # The copy in the artifact store itself is damaged: refused, even with a fresh cache.
    stored = _artifact_store_copy(store, request, model, "model.safetensors")
    _flip_byte(stored)
    shutil.rmtree(cached)
    with pytest.raises(registry.ModelIntegrityError, match=r"model\.safetensors.*sha256"):
        registry.resolve_model_path(store, model.uri)


def _artifact_store_copy(settings: Settings, request: pytest.FixtureRequest, model: registry.RegisteredModel,
                         filename: str) -> Path:
    """Where the artifact store keeps one file of a version (local folder behind either store)."""
    source = registry.client(settings).get_model_version(model.name, model.version).source
    if source.startswith("mlflow-artifacts:"):
        server: MlflowServer = request.getfixturevalue("mlflow_server")
        root = server.artifacts_destination / source.removeprefix("mlflow-artifacts:").lstrip("/")
    else:
        root = Path(source.removeprefix("file://"))
    assert (root / filename).is_file(), root
    return root / filename


def test_rerun_with_the_same_training_key_registers_nothing(store: Settings, tiny_model_dir: Path,  # noqa: F811
                                                             tmp_path: Path, request: pytest.FixtureRequest) -> None:
    name = _model_name(request, "idem")
    source = _copy(tiny_model_dir, tmp_path / "out")
    key = {registry.TRAINING_KEY_TAG: "inputs-v3-settings-abc"}
    tags = {**key, "git_sha": "deadbeef"}
    assert registry.find_model_version(store, name, key) is None
    first = registry.register_model(store, name=name, model_dir=source, run_id=_run_id(store, "a"), tags=tags)
    again = registry.register_model(store, name=name, model_dir=source, run_id=_run_id(store, "b"), tags=tags)
    assert again == first
    assert registry.find_model_version(store, name, key) == first
    assert registry.find_model_version(store, name, {registry.TRAINING_KEY_TAG: "other"}) is None
    versions = registry.client(store).search_model_versions(f"name = '{name}'")
    assert [str(v.version) for v in versions] == ["1"]


def test_alias_moves_and_unknown_references_fail_clearly(store: Settings, tiny_model_dir: Path,  # noqa: F811
                                                          tmp_path: Path, request: pytest.FixtureRequest) -> None:
    name = _model_name(request, "alias")
    run_id = _run_id(store, "alias")
    source = _copy(tiny_model_dir, tmp_path / "out")
    v1 = registry.register_model(store, name=name, model_dir=source, run_id=run_id, tags={"round": "1"})
    (source / "generation_config.json").write_text(json.dumps({"max_new_tokens": 7}))  # a different model
    v2 = registry.register_model(store, name=name, model_dir=source, run_id=run_id, tags={"round": "2"})
    assert registry.get_by_alias(store, name, "challenger").version == v2.version == "2"
    assert registry.get_model_version(store, name, "1").aliases == ()
    registry.set_alias(store, name, "champion", v1.version)
    registry.set_version_tag(store, name, v1.version, "jzlake.gate", "promoted")
    champion = registry.get_by_alias(store, name, "champion")
    assert (champion.version, champion.tags["jzlake.gate"], champion.aliases) == ("1", "promoted", ("champion",))
    champion_dir = registry.resolve_model_path(store, f"models:/{name}@champion")
    challenger_dir = registry.resolve_model_path(store, f"models:/{name}@challenger")
    original = (tiny_model_dir / "generation_config.json").read_text()
    assert (champion_dir / "generation_config.json").read_text() == original
    assert json.loads((challenger_dir / "generation_config.json").read_text()) == {"max_new_tokens": 7}
    registry.set_alias(store, name, "champion", v2.version)  # moved, not copied
    assert registry.get_model_version(store, name, "1").aliases == ()
    assert registry.get_by_alias(store, name, "champion").version == "2"
    assert registry.get_by_alias(store, name, "nope") is None
    assert registry.get_by_alias(store, "no-such-model", "champion") is None
    with pytest.raises(registry.ModelNotFoundError, match=rf"{name}.*'nope'"):
        registry.resolve_model_path(store, f"models:/{name}@nope")
    with pytest.raises(registry.ModelNotFoundError, match=rf"models:/{name}/9"):
        registry.resolve_model_path(store, f"models:/{name}/9")


def test_only_safetensors_models_are_registered(tmp_path: Path, tiny_model_dir: Path) -> None:  # noqa: F811
    settings = make_settings(tmp_path, home=str(tmp_path),
                             mlflow={"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
                                     "artifact_root": str(tmp_path / "artifacts")})
    pickled = _copy(tiny_model_dir, tmp_path / "pickled")
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    with pytest.raises(ValueError, match="not a safetensors model"):
        registry.register_model(settings, name="bad", model_dir=pickled, run_id="unused", tags={})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        registry.register_model(settings, name="bad", model_dir=tmp_path / "nowhere", run_id="unused", tags={})
    assert registry.get_by_alias(settings, "bad", "challenger") is None
    with pytest.raises(ValueError, match="models:/NAME/VERSION"):
        registry.resolve_model_path(settings, "models:/bad/latest")
