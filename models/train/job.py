"""What both training jobs share: preflight, training key, run folder, MLflow, registration.

A job (``models/train/synthesizer.py``, ``models/train/jiuzhang.py``) supplies its **examples**
(prompt ids + target text, read from pinned inputs) and their **lineage** (table → Delta
version, file → sha256). ``run_training`` then:

1. resolves the base model and tokenizer (a reference that does not resolve is an error) and
   tokenizes every example (a max length shorter than a prompt is an error) — all before any
   compute and before anything is registered;
2. derives the **training key** — a hash of the job, the base model's identity, the input
   lineage and every setting that changes the weights — and returns the registered version
   already tagged with it, if any (``registry.find_model_version``): same inputs, nothing new;
3. trains in ``<runs>/train/<job>/<key>/`` (checkpoints, then ``model/``; a killed job resumes
   from its last checkpoint), logging params, loss/lr curves, ``mlflow.data`` inputs, git sha
   and package versions to one MLflow run;
4. registers ``model/`` as a version of ``train.<job>.registered_model`` with lineage tags and
   the alias ``challenger`` (``registry.register_model``; large weights by reference).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from jzlake.lineage import stable_hash
from jzlake.settings import Settings, TrainJobSettings, TrainRecipe
from models.train import data
from models.train.loop import TrainResult, load_model, make_accelerator, mergeable, resolve_device, train

REPO = Path(__file__).resolve().parents[2]
TRAINING_KEY_TAG = "jzlake.training_key"  # = models.registry.TRAINING_KEY_TAG (kept import-light)
COMPLETE_MARKER = ".jzlake-train-complete.json"
# Settings that do not change the trained weights stay out of the training key.
RUNTIME_FIELDS = {"device", "checkpoint_every", "keep_checkpoints", "register_version", "alias", "torch_threads",
                  "registered_model", "gpu", "cpu", "input_version"}
PACKAGES = ("torch", "transformers", "accelerate", "peft", "mlflow", "safetensors", "tokenizers")


@dataclass(frozen=True)
class Example:
    """One training example before tokenization: a chat prompt (``messages``) or a plain-text
    prompt (``prompt``), and the target text the loss is taken on."""

    target: str
    source: str
    messages: tuple[dict[str, str], ...] | None = None
    prompt: str | None = None


@dataclass
class TrainingInputs:
    """A job's examples in training order, their lineage, and what the summary should say."""

    examples: list[Example]
    data_tables: dict[str, int]                        # table -> Delta version read
    data_files: dict[str, str] = field(default_factory=dict)  # file -> sha256
    counts: dict[str, int] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)
    format_seed: bool = False
    chat: bool = True                                  # prompts go through the chat template
    shuffle: bool = True                               # shuffle per epoch (else keep the order)


@dataclass(frozen=True)
class BaseModel:
    path: Path
    reference: str
    identity: str


# ---- preflight ----------------------------------------------------------------------------------

def job_recipe(config: TrainJobSettings, device: str) -> TrainRecipe:
    """The GPU recipe (the paper's settings) on CUDA, the CPU recipe (tiny model) otherwise."""
    return config.gpu if device.startswith("cuda") else config.cpu


def resolve_base_model(settings: Settings, reference: str | None) -> BaseModel:
    """The base model's directory and identity; ``None`` is the tiny local model."""
    if reference is None:
        from models.tiny import MARKER, ensure_tiny_model

        path = ensure_tiny_model(settings)
        return BaseModel(path, "tiny-llama", json.loads((path / MARKER).read_text())["weights_sha256"])
    from models.registry import resolve_model_path

    try:
        path = resolve_model_path(settings, reference)
    except Exception as exc:  # MLflow raises its own types for an unknown name/alias/version
        raise data.TrainingInputError(
            f"base model {reference!r} does not resolve: {exc}. Give a local Hugging Face model directory "
            "(download it first; no hub access) or an existing models:/NAME@ALIAS or models:/NAME/VERSION") from exc
    files = sorted((p.name, p.stat().st_size) for p in path.iterdir() if p.is_file())
    return BaseModel(path, reference, stable_hash((path / "config.json").read_text(), files))


def load_tokenizer(base: BaseModel, need_chat_template: bool) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base.path)
    if need_chat_template:
        data.require_chat_template(tokenizer, base.reference)
    if tokenizer.eos_token_id is None:
        raise data.TrainingInputError(f"the tokenizer of {base.reference} has no EOS token: every target ends with one")
    return tokenizer


def tokenize(tokenizer: Any, inputs: TrainingInputs, max_length: int) -> tuple[list[data.Sample], int]:
    """``(samples, truncated targets)``; prompts that do not fit raise before any compute."""
    samples: list[data.Sample] = []
    truncated = 0
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    for n, example in enumerate(inputs.examples):
        if example.messages is not None:
            prompt = data.chat_prompt_ids(tokenizer, example.messages)
        else:
            prompt = bos + data.text_ids(tokenizer, example.prompt or "")
        sample, cut = data.make_sample(prompt, data.text_ids(tokenizer, example.target), tokenizer.eos_token_id,
                                       max_length, example.source, what=f"example {n} ({example.source})")
        samples.append(sample)
        truncated += cut
    return samples, truncated


def plan_steps(samples: Sequence[data.Sample], recipe: TrainRecipe, seed: int, shuffle: bool) -> list[list[data.Row]]:
    """The full, deterministic list of global batches (epochs × order × packing)."""
    ordered = data.epoch_order(samples, recipe.epochs, seed, shuffle=shuffle)
    rows = data.pack_rows(ordered, recipe.max_length) if recipe.packing else data.single_rows(ordered)
    return data.global_batches(rows, recipe.global_batch_size)


def training_key(job: str, base: BaseModel, inputs: TrainingInputs, recipe: TrainRecipe,
                 config: TrainJobSettings) -> str:
    """Same job, base model, input lineage and weight-changing settings → same key."""
    job_config = {k: v for k, v in config.model_dump().items() if k not in RUNTIME_FIELDS}
    return stable_hash("train", job, base.identity, inputs.data_tables, inputs.data_files, inputs.format_seed,
                       recipe.model_dump(), job_config)


# ---- environment --------------------------------------------------------------------------------

def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def run_folder(settings: Settings, job: str, key: str) -> Path:
    return Path(settings.runs_dir) / "train" / job / key


# ---- MLflow -------------------------------------------------------------------------------------

def log_inputs(mlflow: Any, settings: Settings, inputs: TrainingInputs) -> None:
    """The input tables (name + Delta version) and files (path + sha256) as ``mlflow.data`` inputs."""
    from mlflow.data.delta_dataset_source import DeltaDatasetSource
    from mlflow.data.meta_dataset import MetaDataset

    from models import lake_io

    datasets = [MetaDataset(DeltaDatasetSource(path=lake_io.table_uri(settings, name), delta_table_version=version),
                            name=name, digest=stable_hash(name, version, length=16))
                for name, version in sorted(inputs.data_tables.items())]
    if inputs.data_files:
        import warnings

        from mlflow.data.dataset_source_registry import resolve_dataset_source

        for path, sha in sorted(inputs.data_files.items()):
            with warnings.catch_warnings():  # "can be interpreted in multiple ways": local file, as meant
                warnings.simplefilter("ignore", UserWarning)
                source = resolve_dataset_source(path)
            datasets.append(MetaDataset(source, name=Path(path).name, digest=sha[:16]))
    mlflow.log_inputs(datasets=datasets, contexts=["training"] * len(datasets), tags_list=[None] * len(datasets))


class MetricBuffer:
    """Loss/lr points logged in batches (one HTTP/SQL call per ``every`` steps, not per step)."""

    def __init__(self, client: Any, run_id: str, every: int = 20) -> None:
        self.client, self.run_id, self.every = client, run_id, every
        self.pending: list[Any] = []

    def add(self, step: int, loss: float, lr: float) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending += [Metric("loss", loss, now, step), Metric("lr", lr, now, step)]
        if len(self.pending) >= 2 * self.every:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.client.log_batch(self.run_id, metrics=self.pending)
            self.pending = []


# ---- the run ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class JobOptions:
    """Per-invocation knobs (CLI flags), none of which changes the training key."""

    stop_after_step: int | None = None
    progress: bool = True


def _summary(job: str, config: TrainJobSettings, key: str, inputs: TrainingInputs, **fields: Any) -> dict[str, Any]:
    return {"stage": f"train-{job}", "model_name": config.registered_model, "training_key": key,
            "data_tables": inputs.data_tables, "format_seed": inputs.format_seed, "examples": len(inputs.examples),
            "counts": inputs.counts, **inputs.notes, **fields}


def _registered_fields(version: Any) -> dict[str, Any]:
    return {"version": version.version, "alias": ",".join(version.aliases) or None, "model_uri": version.uri,
            "run_id": version.run_id}


def run_training(settings: Settings, job: str, config: TrainJobSettings, read_inputs: Callable[[], TrainingInputs],
                 options: JobOptions | None = None) -> dict[str, Any]:
    """Preflight → idempotence check → train (resumable) → save → register; returns the summary."""
    options = options or JobOptions()
    started = time.perf_counter()
    _quiet_libraries()
    times: dict[str, float] = {}
    device = resolve_device(config.device)
    recipe = job_recipe(config, device)
    if config.torch_threads:
        import torch

        torch.set_num_threads(config.torch_threads)

    inputs = read_inputs()                                   # clear errors for missing/empty inputs
    base = resolve_base_model(settings, recipe.base_model)   # ... for a reference that does not resolve
    tokenizer = load_tokenizer(base, need_chat_template=inputs.chat)
    samples, truncated = tokenize(tokenizer, inputs, recipe.max_length)  # ... for a too-short max length
    key = training_key(job, base, inputs, recipe, config)
    times["prepare_s"] = round(time.perf_counter() - started, 2)

    if config.register_version:
        from models.registry import find_model_version

        existing = find_model_version(settings, config.registered_model, {TRAINING_KEY_TAG: key})
        if existing is not None:
            return _summary(job, config, key, inputs, registered=False, reused=True, **_registered_fields(existing),
                            tokens_trained=0, loss_first=None, loss_last=None,
                            seconds=round(time.perf_counter() - started, 2), stage_seconds=times)

    folder = run_folder(settings, job, key)
    model_dir = folder / "model"
    steps = plan_steps(samples, recipe, config.seed, inputs.shuffle)
    marker = model_dir / COMPLETE_MARKER
    accelerator = make_accelerator(device, recipe.precision)
    main_process = accelerator.is_main_process
    if recipe.method == "lora" and accelerator.num_processes > 1:
        raise data.TrainingInputError("LoRA is trained on one process here (merging adapters needs the full "
                                      "weights); use method: full with the FSDP config, or a single GPU")
    base_tags = {TRAINING_KEY_TAG: key, "base_model": base.reference, "data_tables": json.dumps(
        inputs.data_tables, sort_keys=True), "git_sha": git_sha(), "format_seed": str(inputs.format_seed).lower(),
        "job": f"train-{job}"}

    if marker.is_file():  # trained earlier (e.g. registration failed after): do not train again
        done = json.loads(marker.read_text())
        result_fields = done["result"]
        run_id = done["training_run_id"]
    else:
        run_id, result = _train_and_log(settings, job, config, recipe, base, inputs, samples, steps, folder,
                                        device, accelerator, base_tags, options)
        times["train_s"] = round(result.seconds, 2)
        result_fields = {"steps": result.total_steps, "steps_run": result.steps_run,
                         "resumed_from_step": result.resumed_from_step, "tokens_trained": result.tokens,
                         "target_tokens": result.target_tokens, "loss_first": result.loss_first,
                         "loss_last": result.loss_last}
        if not result.finished:
            return _summary(job, config, key, inputs, registered=False, finished=False, run_id=run_id,
                            checkpoints=str(folder / "checkpoints"), device=device, **result_fields,
                            seconds=round(time.perf_counter() - started, 2), stage_seconds=times)
        if main_process:
            _write_json(marker, {"training_run_id": run_id, "result": result_fields, "training_key": key})

    summary = _summary(job, config, key, inputs, finished=True, run_id=run_id, model_dir=str(model_dir),
                       device=device, method=recipe.method, packing=recipe.packing, truncated_targets=truncated,
                       **result_fields)
    if config.register_version and main_process:
        from models.registry import register_model

        register_started = time.perf_counter()
        version = register_model(settings, name=config.registered_model, model_dir=model_dir, run_id=run_id,
                                 tags={**base_tags, "training_run_id": run_id}, alias=config.alias)
        times["register_s"] = round(time.perf_counter() - register_started, 2)
        summary.update(registered=True, **_registered_fields(version))
    else:
        summary.update(registered=False, version=None, alias=None)
    summary.update(seconds=round(time.perf_counter() - started, 2), stage_seconds=times)
    return summary


def _train_and_log(settings: Settings, job: str, config: TrainJobSettings, recipe: TrainRecipe, base: BaseModel,
                   inputs: TrainingInputs, samples: Sequence[data.Sample], steps: list[list[data.Row]], folder: Path,
                   device: str, accelerator: Any, tags: Mapping[str, str], options: JobOptions
                   ) -> tuple[str, TrainResult]:
    """Train (every process) under one MLflow run (the main process logs); save ``folder/model``."""
    from models import registry

    main = accelerator.is_main_process
    model = load_model(base.path, recipe, config.seed)
    tokenizer = load_tokenizer(base, need_chat_template=False)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    mlflow = registry.configure(settings) if main else None
    run_context = (registry.start_run(settings, f"train-{job}", tags[TRAINING_KEY_TAG], tags=dict(tags)) if main
                   else contextlib.nullcontext(None))
    with run_context as run:
        buffer = None
        if mlflow is not None:
            params = {**{f"recipe.{k}": v for k, v in recipe.model_dump().items()},
                      **{f"job.{k}": v for k, v in config.model_dump(exclude={"gpu", "cpu"}).items()},
                      "device": device, "samples": len(samples), "steps": len(steps),
                      "rows": sum(len(s) for s in steps), "base_model_identity": base.identity,
                      **{f"pkg.{k}": v for k, v in package_versions().items()}}
            mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
            log_inputs(mlflow, settings, inputs)
            buffer = MetricBuffer(mlflow.MlflowClient(), run.info.run_id)
        prepared, result = train(model, steps, recipe, pad_id=pad_id, checkpoint_root=folder / "checkpoints",
                                 device=device, seed=config.seed, checkpoint_every=config.checkpoint_every,
                                 keep_checkpoints=config.keep_checkpoints, stop_after_step=options.stop_after_step,
                                 on_step=buffer.add if buffer else None, accelerator=accelerator)
        if buffer is not None:
            for step in range(result.resumed_from_step or 0):  # the curve before the restart
                buffer.add(step, result.losses[step], result.lrs[step])
            buffer.flush()
            mlflow.log_metrics({"tokens_trained": result.tokens, "target_tokens": result.target_tokens,
                                "train_seconds": result.seconds})
        if result.finished:
            save_model(accelerator, prepared, tokenizer, folder / "model")
    return (run.info.run_id if run is not None else ""), result


def save_model(accelerator: Any, prepared: Any, tokenizer: Any, out_dir: Path) -> None:
    """The trained model (LoRA merged) + tokenizer as a loadable safetensors directory.

    Every process calls this (under FSDP gathering the full state dict is collective); the main
    process writes."""
    state = accelerator.get_state_dict(prepared)
    if not accelerator.is_main_process:
        return
    model = accelerator.unwrap_model(prepared)
    out_dir.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "merge_and_unload"):
        model, state = mergeable(model), None  # LoRA: single process holds the full weights (checked up front)
    model.config.use_cache = True
    model.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
    tokenizer.save_pretrained(out_dir, save_jinja_files=False)


def _quiet_libraries() -> None:
    """One line per finished step on the console: library progress bars and notices stay off."""
    import logging

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    # "Removed shared tensor {'lm_head.weight'}" on every checkpoint of a tied-embedding model
    logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)


def _write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)
