"""MLflow helpers shared by the model jobs: tracking store, runs, the model registry, model references.

The tracking URI comes from ``settings.mlflow`` (default: SQLite under ``var/mlflow/``, artifacts
in ``var/mlflow/artifacts``; an ``http://`` URI talks to an ``mlflow server``);
``MLFLOW_TRACKING_URI`` reaches it through the settings loader. Relative SQLite/file paths are
resolved against ``settings.home`` so every process of a run (CLI, Airflow task, subprocess)
talks to the same store. The registry lives in the same store.

Registered models (``register_model``). A model version's source is a folder of the training
run's artifacts (``registered_model/<name>/<manifest hash>/``, the form MLflow's docs give for
``create_model_version``: the run's artifact URI + path, so ``models:/`` download works through
MLflow's own artifact repositories, over HTTP too). That folder always holds
``jzlake_manifest.json``: every file of the model with its size and sha256. Then either

* **artifact** storage (small models, ``mlflow.artifact_max_bytes``): the files sit next to the
  manifest; or
* **reference** storage (large checkpoints): only the manifest, each entry carrying the file's
  URI where the job wrote it (a local folder or an object store read through pyarrow,
  ``jzlake.uris``). The weights are never copied into MLflow.

``resolve_model_path`` turns ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS`` into a loadable
local model directory under ``models.cache_dir`` (local referenced files are symlinked, remote
ones downloaded) and checks every file against the manifest on every load: a missing or
changed file is refused with ``ModelIntegrityError`` naming it. Weights must be safetensors
(no pickle files are registered).

Idempotence: a training job tags its version with ``jzlake.training_key`` (a hash of its
inputs and settings); ``find_model_version`` finds it, and ``register_model`` returns the
existing version instead of creating another.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jzlake.lineage import stable_hash
from jzlake.settings import Settings, is_uri

RUN_KEY_TAG = "jzlake.run_key"
TRAINING_KEY_TAG = "jzlake.training_key"
STORAGE_TAG = "jzlake.storage"              # "artifact" | "reference"
MANIFEST_SHA_TAG = "jzlake.manifest_sha256"
MODEL_BYTES_TAG = "jzlake.model_bytes"
MANIFEST_FILE = "jzlake_manifest.json"
MANIFEST_FORMAT = "jzlake-model-manifest/1"
ARTIFACT_DIR = "registered_model"
DEFAULT_ALIAS = "challenger"
# Pickle-based weight files: never registered (loading them runs arbitrary code).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
_CHUNK = 8 << 20


class ModelIntegrityError(RuntimeError):
    """A registered model's file is missing or differs from its manifest."""


class ModelNotFoundError(LookupError):
    """A ``models:/`` reference names no registered version."""


@dataclass(frozen=True)
class RegisteredModel:
    """One registered model version as the lake sees it."""

    name: str
    version: str
    uri: str            # models:/NAME/VERSION
    run_id: str
    tags: dict[str, str]
    aliases: tuple[str, ...]


# ---- tracking store ------------------------------------------------------------------------------

def tracking_uri(settings: Settings) -> str:
    """The configured tracking URI with relative SQLite/file paths made absolute (parents created)."""
    uri = settings.mlflow.tracking_uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path = Path(settings.path(uri.removeprefix("sqlite:///")))
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path}"
    if "://" not in uri:
        path = Path(settings.path(uri))
        path.mkdir(parents=True, exist_ok=True)
        return path.as_uri()
    return uri


def is_remote_server(settings: Settings) -> bool:
    """True when the tracking URI is an ``mlflow server`` (which decides where artifacts go)."""
    return settings.mlflow.tracking_uri.startswith(("http://", "https://"))


def artifact_location(settings: Settings) -> str:
    root = settings.mlflow.artifact_root
    return root if "://" in root else Path(settings.path(root)).as_uri()


def configure(settings: Settings) -> Any:
    """Point the ``mlflow`` module (tracking and registry) at the configured store; returns it."""
    import mlflow

    uri = tracking_uri(settings)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return mlflow


def client(settings: Settings) -> Any:
    """An ``MlflowClient`` on the configured tracking store and registry."""
    mlflow = configure(settings)
    uri = tracking_uri(settings)
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def experiment_id(settings: Settings, name: str | None = None) -> str:
    """The experiment's id, created on first use: with the configured artifact root on a local
    store; a server uses its own (``--artifacts-destination``, served as ``mlflow-artifacts:/``)."""
    name = name or settings.mlflow.experiment
    mlflow_client = client(settings)
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None if is_remote_server(settings) else f"{artifact_location(settings)}/{name}"
    try:
        return mlflow_client.create_experiment(name, artifact_location=location)
    except Exception:  # created concurrently by another process
        experiment = mlflow_client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def find_run(settings: Settings, run_key: str, experiment: str | None = None) -> Any | None:
    """The finished run tagged with ``run_key`` (idempotent logging: log a run key once)."""
    mlflow = configure(settings)
    runs = mlflow.search_runs(experiment_ids=[experiment_id(settings, experiment)],
                              filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key}' and attributes.status = 'FINISHED'",
                              output_format="list", max_results=1)
    return runs[0] if runs else None


@contextlib.contextmanager
def start_run(settings: Settings, run_name: str, run_key: str, tags: Mapping[str, str] | None = None,
              experiment: str | None = None) -> Iterator[Any]:
    """An MLflow run tagged with ``run_key`` (the stage's content-addressed run id)."""
    mlflow = configure(settings)
    with mlflow.start_run(experiment_id=experiment_id(settings, experiment), run_name=run_name,
                          tags={RUN_KEY_TAG: run_key, **(tags or {})}) as run:
        yield run


# ---- manifests -----------------------------------------------------------------------------------

def _sha256_stream(stream: Any, sink: Any | None = None) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    while chunk := stream.read(_CHUNK):
        digest.update(chunk)
        size += len(chunk)
        if sink is not None:
            sink.write(chunk)
    return digest.hexdigest(), size


def file_sha256(path: Path) -> str:
    """Hex sha256 of a local file (streamed)."""
    with open(path, "rb") as stream:
        return _sha256_stream(stream)[0]


def _model_files(model_dir: str) -> list[tuple[str, str, str, int]]:
    """``(relative path, URI, filesystem path, size)`` of every file under a local folder or an
    object-store URI (hidden files skipped)."""
    from pyarrow import fs as pafs

    from jzlake.uris import arrow_filesystem

    filesystem, root = arrow_filesystem(model_dir)
    root = root.rstrip("/")
    if filesystem.get_file_info(root).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"model directory {model_dir} does not exist (the training job writes it)")
    files = []
    for entry in filesystem.get_file_info(pafs.FileSelector(root, recursive=True)):
        relative = entry.path[len(root) + 1:]
        if entry.type != pafs.FileType.File or any(part.startswith(".") for part in relative.split("/")):
            continue
        uri = f"{model_dir.rstrip('/')}/{relative}" if is_uri(model_dir) else Path(entry.path).as_uri()
        files.append((relative, uri, entry.path, entry.size))
    return sorted(files)


def build_manifest(model_dir: Path | str) -> dict[str, Any]:
    """Manifest of a saved model directory (local or object store): URI, size, sha256 per file.

    Refuses a directory that is not a loadable safetensors model (no ``config.json``, no
    ``*.safetensors``, or pickle weights) before anything is hashed.
    """
    from jzlake.uris import arrow_filesystem

    location = str(model_dir)
    files = _model_files(location)
    names = {relative for relative, _, _, _ in files}
    pickles = sorted(n for n in names if n.endswith(PICKLE_SUFFIXES))
    if "config.json" not in names or not any(n.endswith(".safetensors") for n in names) or pickles:
        raise ValueError(f"model directory {location} is not a safetensors model (config.json and *.safetensors "
                         f"required, no pickle weights; found {sorted(names)[:12]}): save it with "
                         "save_pretrained(..., safe_serialization=True)")
    filesystem, _ = arrow_filesystem(location)
    entries = []
    for relative, uri, path, size in files:
        with filesystem.open_input_stream(path) as stream:
            sha, read = _sha256_stream(stream)
        if read != size:
            raise RuntimeError(f"{uri} changed while it was hashed ({size} → {read} bytes); register a finished model")
        entries.append({"path": relative, "uri": uri, "size": size, "sha256": sha})
    return {"format": MANIFEST_FORMAT, "root": location if is_uri(location) else str(Path(location).resolve()),
            "total_bytes": sum(e["size"] for e in entries), "files": entries}


def manifest_sha256(manifest: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def verify_model_dir(directory: Path, manifest: Mapping[str, Any], label: str) -> None:
    """Check every manifest file in ``directory`` (size, then sha256); raise naming the first bad one."""
    for entry in manifest["files"]:
        path = directory / entry["path"]
        where = f"{entry['path']} (registered from {entry['uri']})"
        if not path.is_file():
            raise ModelIntegrityError(f"{label}: file {where} is missing; restore it or register the model again")
        size = path.stat().st_size
        if size != entry["size"]:
            raise ModelIntegrityError(f"{label}: file {where} has {size} bytes, the manifest says {entry['size']}; "
                                      "it changed after registration — restore it or register the model again")
        sha = file_sha256(path)
        if sha != entry["sha256"]:
            raise ModelIntegrityError(f"{label}: file {where} has sha256 {sha[:16]}…, the manifest says "
                                      f"{entry['sha256'][:16]}…; it changed after registration — restore it or "
                                      "register the model again")


# ---- registry ------------------------------------------------------------------------------------

def _registered(version: Any) -> RegisteredModel:
    return RegisteredModel(name=version.name, version=str(version.version),
                           uri=f"models:/{version.name}/{version.version}", run_id=version.run_id or "",
                           tags={k: str(v) for k, v in (version.tags or {}).items()},
                           aliases=tuple(sorted(version.aliases or ())))


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


def find_model_version(settings: Settings, name: str, tags: Mapping[str, str]) -> RegisteredModel | None:
    """The newest version of ``name`` carrying every tag in ``tags`` (e.g. ``jzlake.training_key``)."""
    if not tags:
        raise ValueError("find_model_version needs at least one tag to match")
    filters = [f"name = '{_quote(name)}'"] + [f"tags.`{key}` = '{_quote(str(value))}'" for key, value in tags.items()]
    found = client(settings).search_model_versions(filter_string=" and ".join(filters))
    if not found:
        return None
    newest = max(found, key=lambda v: int(v.version))
    return get_model_version(settings, name, str(newest.version))  # search results may omit aliases


def get_model_version(settings: Settings, name: str, version: str) -> RegisteredModel:
    """One version, with its tags and aliases; ``ModelNotFoundError`` when it does not exist."""
    try:
        return _registered(client(settings).get_model_version(name, str(version)))
    except Exception as error:
        if _is_missing(error):
            raise ModelNotFoundError(f"models:/{name}/{version} is not registered in "
                                     f"{tracking_uri(settings)}") from error
        raise


def get_by_alias(settings: Settings, name: str, alias: str) -> RegisteredModel | None:
    """The version ``name@alias`` points at, or None (no such model or alias)."""
    try:
        return _registered(client(settings).get_model_version_by_alias(name, alias))
    except Exception as error:
        if _is_missing(error):
            return None
        raise


def set_alias(settings: Settings, name: str, alias: str, version: str) -> None:
    """Point ``name@alias`` at ``version`` (moving it from any other version)."""
    client(settings).set_registered_model_alias(name, alias, str(version))


def delete_alias(settings: Settings, name: str, alias: str) -> None:
    client(settings).delete_registered_model_alias(name, alias)


def set_version_tag(settings: Settings, name: str, version: str, key: str, value: str) -> None:
    """Tag one version (the evaluation gate records its decision this way)."""
    client(settings).set_model_version_tag(name, str(version), key, str(value))


def _is_missing(error: Exception) -> bool:
    """MLflow's "no such model/version/alias" (a missing alias is INVALID_PARAMETER_VALUE "… not found")."""
    code = getattr(error, "error_code", "")
    return code == "RESOURCE_DOES_NOT_EXIST" or (code == "INVALID_PARAMETER_VALUE" and "not found" in str(error))


def register_model(settings: Settings, *, name: str, model_dir: Path | str, run_id: str, tags: Mapping[str, str],
                   alias: str | None = DEFAULT_ALIAS, by_reference: bool | None = None) -> RegisteredModel:
    """Register a saved safetensors model directory as a new version of ``name``.

    The manifest (and, for artifact storage, the files) is logged to run ``run_id`` under
    ``registered_model/<name>/<manifest hash>/`` and that folder becomes the version's source. ``by_reference``
    None decides by size (over ``mlflow.artifact_max_bytes``, or a model on an object store →
    by reference). ``tags`` go on the version (lineage); with ``jzlake.training_key`` among them an
    existing version with the same key is returned as is (nothing new registered, aliases
    untouched). ``alias`` (default ``challenger``) is moved to the new version.
    """
    if TRAINING_KEY_TAG in tags:
        existing = find_model_version(settings, name, {TRAINING_KEY_TAG: tags[TRAINING_KEY_TAG]})
        if existing is not None:
            return existing
    manifest = build_manifest(model_dir)
    remote_dir = is_uri(str(model_dir)) and not str(model_dir).startswith("file:")
    if by_reference is None:
        by_reference = remote_dir or manifest["total_bytes"] > settings.mlflow.artifact_max_bytes
    if not by_reference and remote_dir:
        raise ValueError(f"model {model_dir} is on an object store: register it by reference")
    manifest["storage"] = "reference" if by_reference else "artifact"
    mlflow_client = client(settings)
    run = mlflow_client.get_run(run_id)  # fails early on an unknown run
    # content-addressed: one run may register several models or versions without collisions
    artifact_path = f"{ARTIFACT_DIR}/{name}/{manifest_sha256(manifest)[:16]}"
    with tempfile.TemporaryDirectory(prefix="jz-manifest-") as staging:
        manifest_path = Path(staging) / MANIFEST_FILE
        manifest_path.write_text(json.dumps(manifest, indent=1, sort_keys=True))
        if not by_reference:  # exactly the manifest's files (no job markers or hidden files)
            for entry in manifest["files"]:
                folder = "/".join([artifact_path, *entry["path"].split("/")[:-1]])
                mlflow_client.log_artifact(run_id, str(Path(model_dir) / entry["path"]), folder)
        mlflow_client.log_artifact(run_id, str(manifest_path), artifact_path)
    try:
        mlflow_client.create_registered_model(name)
    except Exception as error:
        if "already exists" not in str(error).lower() and getattr(error, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
            raise
    version_tags = {**{k: str(v) for k, v in tags.items()}, STORAGE_TAG: manifest["storage"],
                    MANIFEST_SHA_TAG: manifest_sha256(manifest), MODEL_BYTES_TAG: str(manifest["total_bytes"])}
    source = f"{run.info.artifact_uri.rstrip('/')}/{artifact_path}"
    version = mlflow_client.create_model_version(name, source, run_id=run_id, tags=version_tags,
                                                 await_creation_for=0)  # SQL stores create READY versions
    if alias:
        mlflow_client.set_registered_model_alias(name, alias, version.version)
    return get_model_version(settings, name, str(version.version))


# ---- resolution ----------------------------------------------------------------------------------

def parse_models_uri(reference: str) -> tuple[str, str | None, str | None]:
    """``models:/NAME/VERSION`` → (NAME, VERSION, None); ``models:/NAME@ALIAS`` → (NAME, None, ALIAS)."""
    body = reference.removeprefix("models:/").strip("/")
    if "@" in body:
        name, alias = body.split("@", 1)
        if name and alias and "/" not in alias:
            return name, None, alias
    else:
        name, _, version = body.partition("/")
        if name and version.isdigit():
            return name, version, None
    raise ValueError(f"model reference {reference!r} is not models:/NAME/VERSION or models:/NAME@ALIAS")


def resolve_model_version(settings: Settings, reference: str) -> RegisteredModel:
    """The registered version a ``models:/`` reference names (an alias read once, here)."""
    name, version, alias = parse_models_uri(reference)
    if alias is not None:
        found = get_by_alias(settings, name, alias)
        if found is None:
            raise ModelNotFoundError(f"{reference}: model {name!r} has no version with alias {alias!r} in "
                                     f"{tracking_uri(settings)}; train and register it first")
        return found
    return get_model_version(settings, name, str(version))


def _materialize_references(staging: Path, manifest: Mapping[str, Any]) -> None:
    """Put each referenced file into ``staging``: local files symlinked, remote ones downloaded."""
    from jzlake.uris import arrow_filesystem

    for entry in manifest["files"]:
        target = staging / entry["path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        uri = entry["uri"]
        if uri.startswith("file:"):
            from urllib.parse import unquote, urlparse

            source = Path(unquote(urlparse(uri).path))
            if source.is_file():
                target.unlink(missing_ok=True)
                target.symlink_to(source)
            continue  # a missing file is reported by verify_model_dir with its name
        filesystem, path = arrow_filesystem(uri)
        try:
            stream = filesystem.open_input_stream(path)
        except (FileNotFoundError, OSError):
            continue
        with stream, open(target, "wb") as sink:
            _sha256_stream(stream, sink)


def _fetch(settings: Settings, model: RegisteredModel, target: Path) -> dict[str, Any]:
    """Download the version's source (manifest, plus files for artifact storage) into ``target``."""
    mlflow = configure(settings)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        mlflow.artifacts.download_artifacts(artifact_uri=model.uri, dst_path=str(staging),
                                            tracking_uri=tracking_uri(settings), registry_uri=tracking_uri(settings))
        manifest_path = staging / MANIFEST_FILE
        if not manifest_path.is_file():
            raise ModelIntegrityError(f"{model.uri}: its source holds no {MANIFEST_FILE}; register it with "
                                      "models.registry.register_model")
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("storage") == "reference":
            _materialize_references(staging, manifest)
        with contextlib.suppress(OSError):
            os.rename(staging, target)  # another process may have won the race: keep its copy
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return json.loads((target / MANIFEST_FILE).read_text())


def _check_manifest(model: RegisteredModel, manifest: Mapping[str, Any]) -> None:
    expected = model.tags.get(MANIFEST_SHA_TAG)
    if expected and manifest_sha256(manifest) != expected:
        raise ModelIntegrityError(f"{model.uri}: {MANIFEST_FILE} does not match the version's "
                                  f"{MANIFEST_SHA_TAG} tag; the registered manifest was modified")


def load_verified(settings: Settings, model: RegisteredModel) -> Path:
    """A local directory holding ``model`` with every file checked against its manifest.

    The cache copy is verified on every call; a bad cache is fetched again once, and a source
    that is still bad (a corrupted or missing shard) is refused naming the file.
    """
    key = stable_hash(tracking_uri(settings), model.name, model.version, model.tags.get(MANIFEST_SHA_TAG), length=16)
    target = Path(settings.path(settings.models.cache_dir)) / "mlflow" / f"{model.name}-v{model.version}-{key}"
    for attempt in (1, 2):
        fresh = not target.is_dir()
        manifest = _fetch(settings, model, target) if fresh else json.loads((target / MANIFEST_FILE).read_text())
        _check_manifest(model, manifest)
        try:
            verify_model_dir(target, manifest, model.uri)
            return target
        except ModelIntegrityError:
            if fresh or attempt == 2:
                raise
            shutil.rmtree(target, ignore_errors=True)  # a damaged cache copy: fetch again
    raise AssertionError("unreachable")


def resolve_model_path(settings: Settings, reference: str) -> Path:
    """A local directory for a model reference: an HF model directory as is, an MLflow
    ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS`` (verified against its manifest, see
    ``load_verified``), or a ``runs:/…`` URI downloaded into the cache."""
    if reference.startswith("models:/"):
        return load_verified(settings, resolve_model_version(settings, reference))
    if not reference.startswith("runs:/"):
        path = Path(settings.path(reference))
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model {reference!r}: {path} has no config.json; give a Hugging Face model "
                                    "directory or an MLflow models:/ URI")
        return path
    mlflow = configure(settings)
    target = Path(settings.path(settings.models.cache_dir)) / "mlflow" / stable_hash(reference, length=16)
    if not target.is_dir():
        target.mkdir(parents=True, exist_ok=True)
        mlflow.artifacts.download_artifacts(artifact_uri=reference, dst_path=str(target))
    for config in sorted(target.rglob("config.json")):
        return config.parent
    raise FileNotFoundError(f"MLflow run artifact {reference} (downloaded to {target}) holds no Hugging Face "
                            "config.json; log the model directory as artifacts")
