"""Our training checkpoints: a plain dict of tensors and settings, loadable with weights_only=True.

Only the trained parts are stored (the heads, and any backbone layers / blocks tuned with them);
the frozen backbones are named so that export and serving can pair the heads with exactly the
backbone they were trained on.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import torch

from teran import backbones
from teran.config import ModelConfig, model_config_from_dict, to_dict
from teran.errors import CheckpointError, TeranInputError
from teran.model import TeranModel

FORMAT = "teran-project-checkpoint"
FORMAT_VERSION = 1


def save_checkpoint(path: str | Path, model: TeranModel, **extra) -> None:
    """Write atomically (temporary file + rename) so a crash never leaves a torn checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_config": to_dict(model.config),
        "backbones": {"image": backbones.IMAGE_BACKBONE, "text": backbones.TEXT_BACKBONE},
        "state_dict": {key: value.cpu() for key, value in model.state_dict().items()},
        **extra,
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def payload_extras(payload: dict) -> dict:
    """What save_checkpoint(**extra) wrote into `payload` (training state, history, ranking settings)."""
    return {
        key: value for key, value in payload.items() if key not in ("format", "format_version", "model_config", "backbones", "state_dict")
    }


def read_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint dict of ours, with a clear error for anything else."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        hint = ""
        if "Namespace" in str(exc):
            hint = " It looks like an original TERAN checkpoint: load it with teran.original.load_original_checkpoint."
        raise CheckpointError(f"{path}: not a readable checkpoint of this project ({str(exc).splitlines()[0]}).{hint}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        keys = sorted(payload)[:6] if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"{path}: not a {FORMAT} file (found {keys})")
    if payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {payload.get('format_version')} is not supported (expected {FORMAT_VERSION})")
    return payload


def load_model(path: str | Path) -> tuple[TeranModel, dict]:
    """Rebuild the model from a checkpoint (strict key and shape match) in eval mode."""
    payload = read_checkpoint(path)
    try:
        config: ModelConfig = model_config_from_dict(payload["model_config"])
    except TeranInputError as exc:
        raise CheckpointError(f"{path}: bad model config ({exc})") from None
    model = TeranModel(config)
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not match the model config ({str(exc).splitlines()[0]})") from None
    model.eval()
    return model, payload
