"""The influence job: prepare → score shards → commit, over the lake (contract: ``models.lake_io``).

* **prepare** (once per run): read the input table at a pinned version, cut excerpts, build the
  candidate units, warm up LoRA and save per-epoch checkpoints, compute the target features of
  every checkpoint, and write the run's ``manifest.json`` last (its presence = prepared).
* **score** (one per shard): the shard's documents (every n-th sorted doc id) get
  Adam-preconditioned features per checkpoint and their LESS score; rows are staged for
  ``gold.influence_scores``. A shard whose staged file exists is done and skipped.
* **commit** (once): every shard staged → MERGE into ``gold.influence_scores``; rank, select
  top-k / top-fraction, MERGE ``gold.selected_texts`` (the current selection); log to MLflow.

The run id is content-addressed — a hash of the input table and version, the model's identity
and every setting that changes a score — so rerunning the same inputs finds the same run
folder, stages the same rows and commits nothing new.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from jzlake.lineage import stable_hash
from jzlake.settings import InfluenceSettings, Settings
from models import lake_io
from models.influence import data, scoring
from models.influence.gradients import gradient_features, trainable_parameters
from models.influence.projection import RademacherProjector
from models.influence.warmup import (
    attach_lora,
    load_checkpoint,
    read_checkpoint_info,
    resolve_device,
    warmup_train,
)

SCORES = "gold.influence_scores"
SELECTED = "gold.selected_texts"
# Settings that do not change a score (runtime knobs and the selection) stay out of the run id.
RUNTIME_FIELDS = {"top_k", "top_fraction", "num_shards", "device", "grad_chunk_size", "projection_cache_mb",
                  "projection_batch_mb",
                  "gradient_method", "torch_threads", "targets"}


# ---- run folder ---------------------------------------------------------------------------------

def run_dir(settings: Settings, run_id: str) -> Path:
    return Path(settings.runs_dir) / "influence" / run_id


def _write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def load_manifest(settings: Settings, run_id: str) -> dict[str, Any]:
    path = run_dir(settings, run_id) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"influence run {run_id} is not prepared ({path} missing): run "
                                "`jzlake influence --phase prepare` first and pass the run id it prints")
    return json.loads(path.read_text())


# ---- model --------------------------------------------------------------------------------------

def model_reference(settings: Settings, config: InfluenceSettings) -> tuple[Path, str, str]:
    """(local directory, reference as configured, identity hash) of the scoring model."""
    if config.model is None:
        from models.tiny import MARKER, ensure_tiny_model

        path = ensure_tiny_model(settings)
        identity = json.loads((path / MARKER).read_text())["weights_sha256"]
        return path, "tiny-llama", identity
    from models.registry import resolve_model_path

    path = resolve_model_path(settings, config.model)
    files = sorted((p.name, p.stat().st_size) for p in path.iterdir() if p.is_file())
    return path, config.model, stable_hash((path / "config.json").read_text(), files)


def load_model(path: Path, device: str) -> tuple[Any, Any, int]:
    """Model (float32, eval) and tokenizer; the pad id falls back to EOS."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return model, tokenizer, int(pad)


def _set_threads(config: InfluenceSettings) -> None:
    if config.torch_threads:
        import torch

        torch.set_num_threads(config.torch_threads)


def _projector(config: InfluenceSettings, num_params: int, device: str) -> RademacherProjector:
    return RademacherProjector(num_params, config.projection_dim, config.projection_seed,
                               block_rows=config.projection_block_rows,
                               cache_bytes=config.projection_cache_mb << 20, device=device)


# ---- inputs -------------------------------------------------------------------------------------

def _units(settings: Settings, config: InfluenceSettings, documents: list[dict[str, Any]]
           ) -> tuple[list[data.Unit], Counter, dict[str, Any]]:
    if config.candidate_unit == "excerpt":
        return data.excerpt_units(documents), Counter(), {}
    known = {d["doc_id"] for d in documents}
    if config.pairs_table:
        rows, version = lake_io.read_table_at(settings, config.pairs_table)
        units, skipped = data.pair_units(rows.to_pylist(), config.pair_columns, known)
        return units, skipped, {"pairs_table": config.pairs_table, "pairs_version": version}
    if config.pairs_path:
        path = Path(settings.path(config.pairs_path))
        units, skipped = data.pair_units(data.read_rows_file(path), config.pair_columns, known)
        return units, skipped, {"pairs_path": str(path), "pairs_sha256": _file_sha256(path)}
    raise ValueError("influence.candidate_unit=pair needs influence.pairs_table (a catalogued table) or "
                     "influence.pairs_path (Parquet/JSONL) with doc_id, prompt and completion columns")


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _targets_fingerprint(settings: Settings, config: InfluenceSettings) -> list[Any]:
    return [(name, t.model_dump(), _file_sha256(Path(settings.path(t.path))))
            for name, t in sorted(config.targets.items())]


def _encode_units(units: Sequence[data.Unit], tokenizer: Any, max_len: int
                  ) -> tuple[list[data.Unit], list[data.Encoded], int]:
    kept, encoded, dropped = [], [], 0
    for unit in units:
        enc = data.encode(tokenizer, unit.prompt, unit.completion, max_len)
        if enc.n_loss_tokens == 0:
            dropped += 1  # the prompt alone fills max_seq_len: nothing left to take a loss on
            continue
        kept.append(unit)
        encoded.append(enc)
    return kept, encoded, dropped


# ---- prepare ------------------------------------------------------------------------------------

def prepare(settings: Settings, config: InfluenceSettings, input_version: int | None = None) -> dict[str, Any]:
    """Pin inputs, warm up, compute target features; returns the run's manifest (reused if present)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from safetensors.torch import save_file

    _set_threads(config)
    corpus, version = lake_io.read_table_at(settings, config.input_table, input_version,
                                            columns=["doc_id", "source", "text"])
    documents, skipped = data.documents_from_corpus(corpus.to_pylist(), config.excerpt_chars)
    units, unit_skips, pair_lineage = _units(settings, config, documents)
    skipped.update(unit_skips)
    model_path, model_ref, model_identity = model_reference(settings, config)
    key_config = {k: v for k, v in config.model_dump().items() if k not in RUNTIME_FIELDS}
    run_key = stable_hash("influence", key_config, config.input_table, version, model_identity,
                          _targets_fingerprint(settings, config), pair_lineage)
    run_id = f"influence-{run_key[:16]}"
    folder = run_dir(settings, run_id)
    if (folder / "manifest.json").is_file():
        return {**load_manifest(settings, run_id), "reused": True}

    started = time.perf_counter()
    device = resolve_device(config.device)
    model, tokenizer, pad_id = load_model(model_path, device)
    units, encoded, no_loss = _encode_units(units, tokenizer, config.max_seq_len)
    if no_loss:
        skipped["no_loss_tokens"] += no_loss
    if not units:
        raise ValueError(f"{config.input_table}@{version} yields no candidate units ({dict(skipped)}); "
                         "check the input table and influence.candidate_unit")
    scored_docs = {u.doc_id for u in units}
    documents = [d for d in documents if d["doc_id"] in scored_docs]
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(documents), folder / "documents.parquet")
    pq.write_table(pa.Table.from_pylist([asdict(u) for u in units]), folder / "units.parquet")

    model = attach_lora(model, config, config.seed)
    warm = data.warmup_subset(range(len(units)), config.warmup_fraction, config.warmup_min_examples,
                              config.seed)
    checkpoints = warmup_train(model, [encoded[i] for i in warm], config, folder / "checkpoints", pad_id, device)
    weights = scoring.checkpoint_weights([c.mean_lr for c in checkpoints])

    targets = data.load_targets(settings, config, fits=lambda t: data.encode(
        tokenizer, t.prompt, t.completion, config.max_seq_len).n_loss_tokens > 0)
    target_encoded = [data.encode(tokenizer, t.prompt, t.completion, config.max_seq_len) for t in targets]
    num_params = sum(p.numel() for _, p in trainable_parameters(model))
    projector = _projector(config, num_params, device)
    features = {}
    for info in checkpoints:
        load_checkpoint(model, folder / "checkpoints" / info.name, config)
        features[info.name] = gradient_features(
            model, target_encoded, projector=projector, pad_id=pad_id, chunk_size=config.grad_chunk_size,
            method=config.gradient_method, project_bytes=config.projection_batch_mb << 20).cpu().contiguous()
    save_file(features, str(folder / "target_features.safetensors"))

    manifest = {
        "run_id": run_id, "run_key": run_key, "input_table": config.input_table, "input_version": version,
        "model": model_ref, "model_path": str(model_path), "model_identity": model_identity,
        "candidate_unit": config.candidate_unit, **pair_lineage,
        "documents": len(documents), "units": len(units), "skipped": dict(skipped),
        "warmup_examples": len(warm), "checkpoints": [asdict(c) for c in checkpoints],
        "checkpoint_weights": weights, "subtasks": data.subtask_names(targets),
        "targets_per_subtask": config.targets_per_subtask, "target_ids": [t.item_id for t in targets],
        "projection": {"seed": config.projection_seed, "dim": config.projection_dim,
                       "block_rows": config.projection_block_rows},
        "lora_parameters": num_params, "config": key_config,
        "prepare_seconds": round(time.perf_counter() - started, 2),
    }
    _write_json(folder / "manifest.json", manifest)  # last: its presence means "prepared"
    return {**manifest, "reused": False}


# ---- score --------------------------------------------------------------------------------------

def score_shard(settings: Settings, config: InfluenceSettings, run_id: str, shard_index: int, num_shards: int,
                force: bool = False) -> dict[str, Any]:
    """Score one shard's documents and stage their ``gold.influence_scores`` rows."""
    import pyarrow.parquet as pq
    import torch
    from safetensors.torch import load_file

    _set_threads(config)
    manifest = load_manifest(settings, run_id)
    staged = lake_io.staged_files(settings, SCORES, run_id)
    mine = lake_io.shard_file_name(shard_index, num_shards)
    if not force and any(Path(f).name == mine for f in staged):
        return {"run_id": run_id, "shard_index": shard_index, "num_shards": num_shards, "skipped": True}

    started = time.perf_counter()
    folder = run_dir(settings, run_id)
    all_units = [data.Unit(**row) for row in pq.read_table(folder / "units.parquet").to_pylist()]
    docs = data.shard_documents(sorted({u.doc_id for u in all_units}), shard_index, num_shards)
    units = [u for u in all_units if u.doc_id in docs]
    device = resolve_device(config.device)
    model, tokenizer, pad_id = load_model(Path(manifest["model_path"]), device)
    run_config = InfluenceSettings.model_validate({**config.model_dump(), **manifest["config"]})
    model = attach_lora(model, run_config, run_config.seed)
    encoded = [data.encode(tokenizer, u.prompt, u.completion, run_config.max_seq_len) for u in units]
    projector = _projector(run_config, manifest["lora_parameters"], device)
    targets = load_file(str(folder / "target_features.safetensors"))

    similarity = None
    names = []
    for info in manifest["checkpoints"]:
        checkpoint = folder / "checkpoints" / info["name"]
        names.append(read_checkpoint_info(checkpoint).name)
        moments = load_checkpoint(model, checkpoint, run_config)
        if not units:
            continue
        feats = gradient_features(model, encoded, projector=projector, pad_id=pad_id,
                                  chunk_size=config.grad_chunk_size, method=config.gradient_method,
                                  moments=moments, project_bytes=config.projection_batch_mb << 20)
        weight = manifest["checkpoint_weights"][len(names) - 1]
        term = weight * (feats @ targets[info["name"]].to(feats.device, feats.dtype).T)
        similarity = term if similarity is None else similarity + term
    seconds = time.perf_counter() - started

    rows = []
    subtasks = manifest["subtasks"]
    if units:
        _, per_subtask = scoring.subtask_scores(similarity, len(subtasks))
        per_subtask = per_subtask.double().cpu()
        by_doc: dict[str, list[int]] = {}
        for i, unit in enumerate(units):
            by_doc.setdefault(unit.doc_id, []).append(i)
        for doc_id in sorted(by_doc):
            doc_sub = per_subtask[torch.tensor(by_doc[doc_id])].mean(0)  # pairs: mean over the doc's units
            rows.append({
                "doc_id": doc_id, "score": float(doc_sub.max()),
                "subtask_scores": {s: float(v) for s, v in zip(subtasks, doc_sub.tolist(), strict=True)},
                "n_units": len(by_doc[doc_id]), "candidate_unit": manifest["candidate_unit"],
                "checkpoints": names, "checkpoint_weights": manifest["checkpoint_weights"],
                "model": manifest["model"], "projection_seed": manifest["projection"]["seed"],
                "projection_dim": manifest["projection"]["dim"], "input_table": manifest["input_table"],
                "input_version": manifest["input_version"], "shard_index": shard_index,
                "num_shards": num_shards, "run_id": run_id,
            })
    lake_io.stage_shard(settings, SCORES, run_id, shard_index, num_shards, rows)
    n_features = len(units) * len(names)
    return {"run_id": run_id, "shard_index": shard_index, "num_shards": num_shards, "skipped": False,
            "documents": len(rows), "units": len(units), "features": n_features,
            "features_per_s": round(n_features / seconds, 2) if seconds else None,
            "seconds": round(seconds, 2)}


# ---- commit -------------------------------------------------------------------------------------

def commit(settings: Settings, config: InfluenceSettings, run_id: str, num_shards: int,
           log_mlflow: bool = True) -> dict[str, Any]:
    """MERGE the staged scores, select the top texts, MERGE ``gold.selected_texts``, log to MLflow."""
    import pyarrow.parquet as pq

    manifest = load_manifest(settings, run_id)
    scores_result = lake_io.commit_staged(settings, SCORES, run_id, num_shards)
    staged = lake_io.read_staged(settings, SCORES, run_id, num_shards).to_pylist()
    scores = {row["doc_id"]: row["score"] for row in staged}
    picked = scoring.select(scores, config.top_k, None if config.top_k is not None else config.top_fraction)
    documents = {d["doc_id"]: d for d in pq.read_table(run_dir(settings, run_id) / "documents.parquet").to_pylist()}
    selected_rows = [{
        "rank": position, "doc_id": doc_id, "score": score, "source": documents[doc_id]["source"],
        "excerpt": documents[doc_id]["excerpt"], "excerpt_start": documents[doc_id]["excerpt_start"],
        "excerpt_end": documents[doc_id]["excerpt_end"], "input_table": manifest["input_table"],
        "input_version": manifest["input_version"], "run_id": run_id,
    } for position, (doc_id, score) in enumerate(picked, start=1)]
    selected_result = lake_io.merge_rows(settings, SELECTED, selected_rows, delete_missing=True)
    selection = {"top_k": config.top_k} if config.top_k is not None else {"top_fraction": config.top_fraction}
    summary = {
        "run_id": run_id, "input_table": manifest["input_table"], "input_version": manifest["input_version"],
        "model": manifest["model"], "candidate_unit": manifest["candidate_unit"],
        "candidates": len(scores), "selected": len(selected_rows), "selection": selection,
        "skipped": manifest["skipped"], "subtasks": manifest["subtasks"],
        "tables": {SCORES: _table_summary(scores_result), SELECTED: _table_summary(selected_result)},
    }
    if log_mlflow:
        summary["mlflow_run_id"] = log_run(settings, manifest, scores, picked, selection, summary)
    return summary


def _table_summary(result: dict[str, Any]) -> dict[str, Any]:
    return {k: result[k] for k in ("version", "committed", "inserted", "updated", "deleted", "unchanged")}


def log_run(settings: Settings, manifest: dict[str, Any], scores: dict[str, float],
            picked: Sequence[tuple[str, float]], selection: dict[str, Any], summary: dict[str, Any]) -> str:
    """One MLflow run per (influence run, selection): params, metrics, score histogram."""
    import tempfile

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from models import registry

    run_key = f"{manifest['run_id']}:{json.dumps(selection, sort_keys=True)}"
    existing = registry.find_run(settings, run_key)
    if existing is not None:
        return existing.info.run_id
    values = np.array(sorted(scores.values()), dtype=float)
    config = manifest["config"]
    params = {
        "run_id": manifest["run_id"], "model": manifest["model"], "input_table": manifest["input_table"],
        "input_version": manifest["input_version"], "candidate_unit": manifest["candidate_unit"],
        "projection_dim": manifest["projection"]["dim"], "projection_seed": manifest["projection"]["seed"],
        "lora_r": config["lora_r"], "lora_alpha": config["lora_alpha"], "lora_dropout": config["lora_dropout"],
        "lora_target_modules": ",".join(config["lora_target_modules"]),
        "warmup_fraction": config["warmup_fraction"], "warmup_epochs": config["warmup_epochs"],
        "warmup_lr": config["warmup_lr"], "max_seq_len": config["max_seq_len"],
        "targets_per_subtask": manifest["targets_per_subtask"], "subtasks": ",".join(manifest["subtasks"]),
        **{f"selection_{k}": v for k, v in selection.items()},
    }
    metrics = {
        "candidates": len(values), "selected": len(picked), "warmup_examples": manifest["warmup_examples"],
        "lora_parameters": manifest["lora_parameters"],
        "score_mean": float(values.mean()) if len(values) else 0.0,
        "score_std": float(values.std()) if len(values) else 0.0,
        "score_min": float(values.min()) if len(values) else 0.0,
        "score_max": float(values.max()) if len(values) else 0.0,
        "selection_threshold": float(picked[-1][1]) if picked else 0.0,
        **{f"skipped_{reason}": n for reason, n in manifest["skipped"].items()},
    }
    for ckpt, weight in zip(manifest["checkpoints"], manifest["checkpoint_weights"], strict=True):
        metrics[f"warmup_loss_{ckpt['name']}"] = ckpt["mean_loss"]
        metrics[f"checkpoint_weight_{ckpt['name']}"] = weight
    with registry.start_run(settings, f"influence {manifest['run_id']}", run_key,
                            tags={"jzlake.stage": "influence"}) as run:
        import mlflow

        mlflow.log_params(params)
        mlflow.log_metrics(metrics)
        figure, axis = plt.subplots(figsize=(6, 3.5))
        axis.hist(values, bins=min(50, max(5, len(values) // 4)), color="#4c72b0")
        if picked:
            axis.axvline(picked[-1][1], color="#c44e52", linestyle="--", label="selection threshold")
            axis.legend()
        axis.set_xlabel("LESS influence score")
        axis.set_ylabel("documents")
        axis.set_title(f"{manifest['run_id']} ({len(values)} candidates)")
        figure.tight_layout()
        mlflow.log_figure(figure, "score_histogram.png")
        plt.close(figure)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "summary.json"
            path.write_text(json.dumps(summary, indent=2, sort_keys=True, default=str))
            mlflow.log_artifact(str(path))
        return run.info.run_id


# ---- everything in one process ------------------------------------------------------------------

def run_all(settings: Settings, config: InfluenceSettings, *, input_version: int | None = None,
            shard_index: int | None = None, force: bool = False, log_mlflow: bool = True) -> dict[str, Any]:
    """prepare → score (every shard, or only ``shard_index``) → commit (only when all shards ran here)."""
    manifest = prepare(settings, config, input_version)
    run_id, shards = manifest["run_id"], config.num_shards
    indices = range(shards) if shard_index is None else [shard_index]
    shard_summaries = [score_shard(settings, config, run_id, i, shards, force=force) for i in indices]
    summary: dict[str, Any] = {"run_id": run_id, "prepared": not manifest["reused"],
                               "shards": shard_summaries}
    if shard_index is None:
        summary.update(commit(settings, config, run_id, shards, log_mlflow=log_mlflow))
    return summary
