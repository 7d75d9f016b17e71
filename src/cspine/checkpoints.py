"""Checkpoints: what each one holds, written and read in one place.

    model, meta = load_slice_model(Run("runs/demo").slice_best(0))   # meta["inputs"]: how it reads a study

Every model is saved by `save_model` and read by `load_model` (the named loaders are its kinds), which
rebuilds the network from the architecture the checkpoint holds (`BUILDERS`).

Every checkpoint holds ``schema`` and ``kind`` ("slice-cnn", "slice-resume", "blstm", "vertebra-lstm",
"segmenter", "crop", "crop-resume", "blend"). Inference takes
everything it needs from the checkpoints (architecture, the preprocessing and reading the CNN trained
with, the studies a model trained on), never from training code or from the config given at predict time.
A checkpoint of another schema, or a damaged one, is an error that names the file.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import torch

from cspine import TARGETS
from cspine.models import CropNet, SequenceNet, SliceNet
from cspine.runs import CheckpointError, atomic_path
from cspine.segmenter import build_segmenter

__all__ = [
    "BUILDERS",
    "CHECKPOINT_SCHEMA",
    "CheckpointError",
    "load_blend",
    "load_checkpoint",
    "load_crop_model",
    "load_model",
    "load_segmenter",
    "load_sequence_model",
    "load_slice_model",
    "load_vertebra_model",
    "save_blend",
    "save_checkpoint",
    "save_model",
    "save_slice_model",
]

CHECKPOINT_SCHEMA = 2  # bumped on any change to what a checkpoint holds; older ones are then refused
# every model checkpoint's kind, and what rebuilds its network from the saved ``arch``
BUILDERS = {
    "slice-cnn": SliceNet,
    "blstm": SequenceNet,
    "vertebra-lstm": SequenceNet,
    "crop": CropNet,
    "segmenter": build_segmenter,
}


def save_checkpoint(state: dict, path: str | os.PathLike, kind: str) -> Path:
    """torch.save of ``state`` with the schema and ``kind`` added, atomically."""
    with atomic_path(path) as tmp:
        torch.save({"schema": CHECKPOINT_SCHEMA, "kind": kind, **state}, tmp)
    return Path(path)


def load_checkpoint(path: str | os.PathLike, kind: str) -> dict:
    """A checkpoint's contents, after checking that it is whole, of this schema and of ``kind``.

    Raises:
        CheckpointError: the file is missing, damaged (a 0-byte or truncated file), of another kind, or was
            written by another version of cspine. The message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except PermissionError:
        raise
    except (EOFError, OSError, RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as exc:
        raise CheckpointError(
            f"{path}: damaged or incomplete checkpoint ({type(exc).__name__}: {exc}); "
            "delete it and train that model again"
        ) from None
    if not isinstance(state, dict) or state.get("schema") != CHECKPOINT_SCHEMA:
        found = state.get("schema") if isinstance(state, dict) else None
        raise CheckpointError(
            f"{path}: checkpoint schema {found}, this cspine reads schema {CHECKPOINT_SCHEMA}; "
            "train again with this version"
        )
    if state["kind"] != kind:
        raise CheckpointError(f"{path}: a {state['kind']!r} checkpoint, not a {kind!r} one")
    return state


def save_model(
    model: torch.nn.Module, path: str | os.PathLike, kind: str, arch: dict | None = None, **info
) -> Path:
    """A model for inference: its weights, the architecture `load_model` rebuilds it from (``model.arch``
    unless given) and ``info`` (how it reads a study, its fold, the studies it trained on, ...)."""
    if kind not in BUILDERS:
        raise ValueError(f"{kind!r} is not a model checkpoint kind ({', '.join(BUILDERS)})")
    state = {"model": model.state_dict(), "arch": model.arch if arch is None else arch, **info}
    return save_checkpoint(state, path, kind)


def load_model(
    path: str | os.PathLike, kind: str, device: torch.device | str = "cpu"
) -> tuple[torch.nn.Module, dict]:
    """The model saved in a checkpoint of ``kind``, rebuilt from its architecture, in eval mode, and its
    metadata (everything but the weights).

    Raises:
        CheckpointError: missing, damaged, of another kind or schema (the file is named).
    """
    state = load_checkpoint(path, kind)
    model = BUILDERS[kind](**state["arch"])
    model.load_state_dict(state["model"])
    return model.to(device).eval(), {k: v for k, v in state.items() if k != "model"}


def save_slice_model(model: SliceNet, path: str | os.PathLike, inputs: dict, **info) -> Path:
    """A slice CNN for inference (`save_model`), with how it reads a study.

    Args:
        inputs: the preprocessing and reading it trained with: ``size``, ``crop``, ``margin`` (the cache's),
            ``input_size`` (the side the CNN reads) and ``context``.
        info: provenance, e.g. ``fold``, ``epoch``, ``val_loss``, ``trained_on`` (study UIDs), ``config``.
    """
    return save_model(model, path, "slice-cnn", inputs=inputs, **info)


def load_slice_model(path: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[SliceNet, dict]:
    """The SliceNet saved in a ``best.pt`` and its metadata (``inputs``: how it reads a study)."""
    return load_model(path, "slice-cnn", device)


def load_sequence_model(
    path: str | os.PathLike, device: torch.device | str = "cpu"
) -> tuple[SequenceNet, dict]:
    """A saved BLSTM and its metadata (input kind, bins, tta, source fold, studies)."""
    return load_model(path, "blstm", device)


def load_vertebra_model(
    path: str | os.PathLike, device: torch.device | str = "cpu"
) -> tuple[SequenceNet, dict]:
    """A saved vertebra-track BiLSTM and its metadata (margin, bins, tta, source fold, studies)."""
    return load_model(path, "vertebra-lstm", device)


def load_crop_model(path: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[CropNet, dict]:
    """A saved crop model and its metadata (how it cuts a vertebra: ``crops``; its fold, its studies)."""
    return load_model(path, "crop", device)


def load_segmenter(
    path: str | os.PathLike, device: torch.device | str = "cpu"
) -> tuple[torch.nn.Module, dict]:
    """A saved segmentation U-Net, in channels_last as it trained (oneDNN on a CPU, tensor cores on a GPU:
    a forward pass over a demo study's planes 0.09 against 0.13 s here), and its metadata (``reading``: how it
    reads a study; fold, studies)."""
    model, meta = load_model(path, "segmenter", device)
    return model.to(memory_format=torch.channels_last), meta


def save_blend(blend: dict, path: str | os.PathLike) -> Path:
    """A level-2 blend: per target its inputs, standardisation, coefficients and intercept (plain numbers,
    no scikit-learn object), ``floor``, what it read (``top_k``, ``margin``, ``sizes``, ``extents``,
    ``vertebra``), each fold's input standardisation (``standards``, or None), its folds and the studies it
    was fitted on."""
    return save_checkpoint(blend, path, "blend")


def load_blend(path: str | os.PathLike) -> dict:
    """A saved level-2 blend (`save_blend`), checked to hold a model for every target.

    Raises:
        CheckpointError: damaged, of another kind or schema, or missing a target (the file is named).
    """
    blend = load_checkpoint(path, "blend")
    missing = [t for t in TARGETS if t not in blend.get("targets", {})]
    if missing:
        raise CheckpointError(
            f"{path}: blend checkpoint without a model for {', '.join(missing)}; run "
            "`python -m cspine blend` again"
        )
    return blend
