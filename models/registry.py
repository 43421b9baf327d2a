"""MLflow helpers shared by the model jobs: tracking store, experiment, runs, model references.

The tracking URI comes from ``settings.mlflow`` (default: SQLite under ``var/mlflow/``, artifacts
in ``var/mlflow/artifacts``); ``MLFLOW_TRACKING_URI`` reaches it through the settings loader.
Relative SQLite/file paths are resolved against ``settings.home`` so every process of a run
(CLI, Airflow task, subprocess) talks to the same store. Later stages add register-by-reference
and alias helpers here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from jzlake.lineage import stable_hash
from jzlake.settings import Settings

RUN_KEY_TAG = "jzlake.run_key"


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


def artifact_location(settings: Settings) -> str:
    root = settings.mlflow.artifact_root
    return root if "://" in root else Path(settings.path(root)).as_uri()


def configure(settings: Settings) -> Any:
    """Point the ``mlflow`` module at the configured store; returns the module."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(settings))
    return mlflow


def experiment_id(settings: Settings, name: str | None = None) -> str:
    """The experiment's id, created (with the configured artifact root) on first use."""
    mlflow = configure(settings)
    name = name or settings.mlflow.experiment
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=f"{artifact_location(settings)}/{name}")
    except Exception:  # created concurrently by another process
        experiment = client.get_experiment_by_name(name)
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


def resolve_model_path(settings: Settings, reference: str) -> Path:
    """A local directory for a model reference: an HF model directory as is, or an MLflow
    ``models:/name/version``, ``models:/name@alias`` or ``runs:/…`` URI downloaded into the cache."""
    if not reference.startswith(("models:/", "runs:/")):
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
    raise FileNotFoundError(f"MLflow model {reference} (downloaded to {target}) holds no Hugging Face "
                            "config.json; log the model directory as artifacts")
