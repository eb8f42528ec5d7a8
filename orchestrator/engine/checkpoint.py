"""The consolidated checkpoint `model.pt`: a plain PyTorch state dict plus what is needed to rebuild the net.

    {"model_name", "build_kwargs", "state_dict", "stage", "epoch", "metrics"}

It is what the next stage starts from, what a teacher or an export loads, and what MLflow keeps. Written to
a temporary name and renamed, so a reader never sees half a file.

A model file is data, never code: it holds tensors and plain Python data only, and every reader (init_from,
the teacher, find_subnets.py, export.py) goes through `read_model_file`, which loads with torch's weights_only
unpickler. `resolve_model_pt` is the one resolver of model references (local path, runs:/, models:/, s3://).
"""
from __future__ import annotations

import hashlib
import os
import pickle
import re
from pathlib import Path

import torch
from torch import nn

import bitmixer_core as core
from orchestrator import atomic
from orchestrator.tracking.credentials import redact_text, redact_uri

MODEL_FILE = "model.pt"


def build_from_kwargs(name: str, build_kwargs: dict) -> nn.Module:
    """bitmixer_core.build_model from the plain-data kwargs of ModelConfig.build_kwargs() (the core takes
    bits and quantizer options as plain mappings)."""
    return core.build_model(name, **build_kwargs)


def save_model_pt(path: str | os.PathLike, *, net: nn.Module, model_name: str, build_kwargs: dict,
                  stage: str, epoch: int, metrics: dict) -> Path:
    """Write model.pt atomically (temp file in the same folder, fsync, rename: orchestrator.atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # fp32 on disk whatever the engine trained in (a bf16 engine's weights load into any later stage).
    state_dict = {k: v.detach().to("cpu", dtype=torch.float32 if v.is_floating_point() else v.dtype, copy=True)
                  for k, v in net.state_dict().items()}
    payload = {"model_name": model_name, "build_kwargs": build_kwargs, "state_dict": state_dict,
               "stage": stage, "epoch": epoch, "metrics": dict(metrics)}
    with atomic.atomic_file(path) as f:
        torch.save(payload, f)
    return path


def state_dict_digest(state_dict: dict) -> str:
    """sha256 over a state dict's names and tensor bytes (proves which weights a stage started from)."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().to("cpu").contiguous()
        digest.update(key.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


class UnsafeModelFile(ValueError):
    """A model file that holds more than tensors and plain data (loading it could run code)."""


# Where a model reference may point: a local path, an MLflow run or registered model, or an S3 object.
ACCEPTED_SOURCES = "a local path, runs:/<run_id>/model.pt, models:/<name>/<version> or s3://bucket/key"
_MLFLOW_SOURCES = ("runs:/", "models:/", "s3://")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):/")


def check_model_reference(uri: str) -> str:
    """`uri` itself if it is a local path or an accepted URI; any other scheme (http, file, ftp, ...) gets a
    sentence naming the accepted ones (read before anything is downloaded)."""
    if _SCHEME.match(uri) and not uri.startswith(_MLFLOW_SOURCES):
        raise ValueError(f"model reference {redact_uri(uri)!r} uses a source the pipeline does not read "
                         f"models from; give {ACCEPTED_SOURCES}.")
    return uri


def resolve_model_pt(uri: str, tracking_uri: str | None = None) -> Path:
    """A local model.pt from a path (a file or a folder holding model.pt) or an accepted URI (runs:/<run>/model.pt,
    models:/..., s3://...), downloaded with the given (else the current) tracking URI."""
    uri = check_model_reference(str(uri))
    if not uri.startswith(_MLFLOW_SOURCES):
        path = Path(uri)
        if path.is_dir():
            path = path / MODEL_FILE
        if not path.is_file():
            raise FileNotFoundError(f"model checkpoint {uri!r} does not exist; give the model.pt written by "
                                    f"the previous stage (or its MLflow URI).")
        return path
    import mlflow
    from mlflow.exceptions import MlflowException
    try:
        source = _registered_version_uri(uri, tracking_uri) if uri.startswith("models:/") and tracking_uri else uri
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, tracking_uri=tracking_uri))
    except MlflowException as err:
        reason = str(err.message).strip().splitlines()[0] if str(err.message).strip() else type(err).__name__
        raise FileNotFoundError(f"model {redact_uri(uri)!r} could not be downloaded ({redact_text(reason)}); "
                                f"check the run id or model name and the tracking URI.") from None
    if local.is_dir():
        if not (local / MODEL_FILE).is_file():
            raise FileNotFoundError(f"{redact_uri(uri)!r} holds no {MODEL_FILE}; name the checkpoint file itself.")
        local = local / MODEL_FILE
    return local


def _registered_version_uri(uri: str, tracking_uri: str) -> str:
    """models:/<name>/<version>[/path] or models:/<name>@<alias>[/path] as the download URI of that version
    in the registry of `tracking_uri` (MLflow itself would look in the process-wide registry)."""
    from mlflow.tracking import MlflowClient
    parts = uri[len("models:/"):].split("/")
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    if "@" in parts[0]:
        name, alias = parts[0].split("@", 1)
        version, rest = client.get_model_version_by_alias(name, alias).version, parts[1:]
    elif len(parts) >= 2:
        name, version, rest = parts[0], parts[1], parts[2:]
    else:
        raise ValueError(f"model reference {uri!r} names no version; write models:/<name>/<version> or "
                         f"models:/<name>@<alias>.")
    base = client.get_model_version_download_uri(name, version).rstrip("/")
    return "/".join([base, *rest]) if rest else base


def read_model_file(path: str | os.PathLike, shown: str | None = None) -> dict:
    """A local model.pt as plain data: tensors, dicts, lists, strings and numbers only (torch's weights_only
    unpickler, which refuses every other object instead of running its constructor)."""
    shown = redact_uri(shown if shown is not None else str(path))
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only" in str(err).lower():
            raise UnsafeModelFile(
                f"model file {shown!r} holds Python objects besides tensors and plain data, so it was not "
                f"loaded (unpickling them could run code); only load model files the pipeline wrote, or "
                f"re-save the weights with orchestrator.engine.checkpoint.save_model_pt.") from None
        raise ValueError(f"{shown!r} is not a model.pt checkpoint ({err}).") from None
    except Exception as err:  # torch raises many kinds for a file that is not a checkpoint
        raise ValueError(f"{shown!r} is not a model.pt checkpoint ({type(err).__name__}: {err}).") from None
    missing = [k for k in ("model_name", "build_kwargs", "state_dict")
               if not isinstance(payload, dict) or k not in payload]
    if missing:
        raise ValueError(f"checkpoint {shown!r} lacks {missing}; it must be a dict with model_name, build_kwargs "
                         "and state_dict (the engine's consolidated model.pt).")
    return payload


def read_model_pt(uri: str, tracking_uri: str | None = None) -> dict:
    """The payload of the model.pt named by `uri` (see resolve_model_pt), read as data only."""
    return read_model_file(resolve_model_pt(uri, tracking_uri), shown=str(uri))


def load_model(uri: str, tracking_uri: str | None = None) -> nn.Module:
    """Rebuild the network saved in a model.pt and load its weights (step sizes, every BN entry too)."""
    return model_from_payload(read_model_pt(uri, tracking_uri))


def model_from_payload(payload: dict) -> nn.Module:
    net = build_from_kwargs(payload["model_name"], payload["build_kwargs"])
    net.load_state_dict(payload["state_dict"], strict=True)
    return net


def load_weights(net: nn.Module, uri: str, *, expect_model: str, tracking_uri: str | None = None,
                 bn: str | None = None) -> dict:
    """Load a previous stage's model.pt into `net` (strict: the architecture must match); returns the payload.

    A model saved with another BN mode than `bn` (Table 1 starts its one-BN-per-bit-width Stage III from the
    Transitional-BN Stage II model) is rebuilt as saved and loaded through core.load_across_bn_modes."""
    payload = read_model_pt(uri, tracking_uri)
    if payload.get("model_name") != expect_model:
        raise ValueError(f"checkpoint {redact_uri(uri)!r} holds a {payload.get('model_name')!r}, not a "
                         f"{expect_model!r}; init_from / teacher_uri must come from the same architecture.")
    saved_bn = payload.get("build_kwargs", {}).get("bn", "transitional")
    if bn is not None and saved_bn != bn:
        core.load_across_bn_modes(net, model_from_payload(payload))
        return payload
    net.load_state_dict(payload["state_dict"], strict=True)
    return payload
