"""Checkpoints: what each one holds, written and read in one place.

    model, meta = load_slice_model(Run("runs/demo").slice_best(0))   # meta.reading: how it reads a study

Every model is saved by `save_model` and read by `load_model` (the named loaders are its kinds), which
rebuilds the network from the architecture the checkpoint holds (`BUILDERS`) and its metadata as the typed
record of its kind (`SliceMeta`, `SequenceMeta`, `VertebraMeta`, `CropMeta`, `SegmenterMeta`): what
inference needs to read a study through the model (a `SliceReading`, a `CropSpec`, a `SegReading`, ...),
and where it came from (its fold, the studies it trained on).

Every checkpoint holds ``schema`` and ``kind`` ("slice-cnn", "slice-resume", "blstm", "vertebra-lstm",
"segmenter", "crop", "crop-resume", "blend"). Inference takes everything it needs from the checkpoints,
never from training code or from the config given at predict time. A checkpoint of another schema, or a
damaged one, is an error that names the file.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import typing
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from cspine import TARGETS
from cspine.crops import CropSpec
from cspine.inputs import SliceReading
from cspine.models import CropNet, SequenceNet, SliceNet
from cspine.runs import CheckpointError, atomic_path
from cspine.segmenter import SegReading, build_segmenter
from cspine.stacking import Blend, TargetModel

__all__ = [
    "BUILDERS",
    "CHECKPOINT_SCHEMA",
    "CheckpointError",
    "CropMeta",
    "SegmenterMeta",
    "SequenceMeta",
    "SliceMeta",
    "VertebraMeta",
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
]

CHECKPOINT_SCHEMA = 4  # bumped on any change to what a checkpoint holds; older ones are then refused


@dataclass(frozen=True)
class SliceMeta:
    """A slice CNN's checkpoint: how it reads a study, and its provenance (``config``: the whole resolved
    config it trained with)."""

    reading: SliceReading
    fold: int
    epoch: int
    val_loss: float
    trained_on: list[str]
    config: dict


@dataclass(frozen=True)
class SequenceMeta:
    """A study BLSTM's checkpoint: what it reads (``input``: "features", "probs" or "fracture", pooled to
    ``bins``; ``tta``: the CNN read each slice mirrored too), and the fold whose CNN's outputs it reads
    (None: the mean of every fold's CNN, a BLSTM trained across folds)."""

    input: str
    bins: int
    tta: bool
    fold: int | None
    trained_on: list[str]


@dataclass(frozen=True)
class VertebraMeta:
    """A vertebra-track BiLSTM's checkpoint: how it reads each vertebra's slices (``margin`` slices wider,
    pooled to ``bins``), where patient_overall comes from (``overall``: `VertebraConfig.overall`), and the
    fold whose CNN's outputs it reads."""

    margin: int
    bins: int
    overall: str
    tta: bool
    fold: int
    trained_on: list[str]


@dataclass(frozen=True)
class CropMeta:
    """A crop model's checkpoint: how it cuts a vertebra, its fold and its studies."""

    spec: CropSpec
    fold: int
    trained_on: list[str]


@dataclass(frozen=True)
class SegmenterMeta:
    """A segmentation U-Net's checkpoint: how it reads a study, its fold, the masked studies it trained on,
    and in a second round the unmasked ones it trained on through pseudo-labels (``pseudo``) and the
    studies of the models that labelled them (``labelled_by``); its training losses."""

    reading: SegReading
    fold: int
    trained_on: list[str]
    pseudo: list[str]
    labelled_by: list[str]
    losses: list[float]


# every model checkpoint's kind: its metadata, and what rebuilds its network from the saved ``arch``
KINDS = {
    "slice-cnn": (SliceMeta, SliceNet),
    "blstm": (SequenceMeta, SequenceNet),
    "vertebra-lstm": (VertebraMeta, SequenceNet),
    "crop": (CropMeta, CropNet),
    "segmenter": (SegmenterMeta, build_segmenter),
}
BUILDERS = {kind: builder for kind, (_, builder) in KINDS.items()}


def _rebuild(cls, values: dict, path: Path):
    """A saved dataclass (`dataclasses.asdict`) as ``cls`` again, its dataclass fields too.

    Raises:
        CheckpointError: the saved fields are not ``cls``'s (the file is named).
    """
    fields = {f.name for f in dataclasses.fields(cls)}
    if set(values) != fields:
        raise CheckpointError(
            f"{path}: its {cls.__name__} holds {sorted(values)}, this cspine reads {sorted(fields)}; "
            "train again with this version"
        )
    hints = typing.get_type_hints(cls)
    return cls(
        **{
            name: _rebuild(hints[name], value, path) if dataclasses.is_dataclass(hints[name]) else value
            for name, value in values.items()
        }
    )


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


def save_model(model: torch.nn.Module, path: str | os.PathLike, meta) -> Path:
    """A model for inference: its weights, the architecture `load_model` rebuilds it from (``model.arch``)
    and its metadata, one of the `KINDS`' records, which names the kind."""
    kind = next((k for k, (cls, _) in KINDS.items() if type(meta) is cls), None)
    if kind is None:
        raise TypeError(f"{type(meta).__name__} is not a checkpoint's metadata ({', '.join(KINDS)})")
    state = {"model": model.state_dict(), "arch": model.arch, "meta": dataclasses.asdict(meta)}
    return save_checkpoint(state, path, kind)


def load_model(path: str | os.PathLike, kind: str, device: torch.device | str = "cpu"):
    """The model saved in a checkpoint of ``kind``, rebuilt from its architecture, in eval mode, and its
    metadata (the kind's record in `KINDS`).

    Raises:
        CheckpointError: missing, damaged, of another kind or schema (the file is named).
    """
    state = load_checkpoint(path, kind)
    meta_cls, builder = KINDS[kind]
    model = builder(**state["arch"])
    model.load_state_dict(state["model"])
    return model.to(device).eval(), _rebuild(meta_cls, state["meta"], Path(path))


def load_slice_model(
    path: str | os.PathLike, device: torch.device | str = "cpu"
) -> tuple[SliceNet, SliceMeta]:
    """The SliceNet saved in a ``best.pt`` and its metadata (``reading``: how it reads a study)."""
    return load_model(path, "slice-cnn", device)


def load_sequence_model(
    path: str | os.PathLike, device: torch.device | str = "cpu"
) -> tuple[SequenceNet, SequenceMeta]:
    """A saved BLSTM and its metadata."""
    return load_model(path, "blstm", device)


def load_vertebra_model(
    path: str | os.PathLike, device: torch.device | str = "cpu"
) -> tuple[SequenceNet, VertebraMeta]:
    """A saved vertebra-track BiLSTM and its metadata."""
    return load_model(path, "vertebra-lstm", device)


def load_crop_model(path: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[CropNet, CropMeta]:
    """A saved crop model and its metadata (``spec``: how it cuts a vertebra)."""
    return load_model(path, "crop", device)


def load_segmenter(
    path: str | os.PathLike, device: torch.device | str = "cpu"
) -> tuple[torch.nn.Module, SegmenterMeta]:
    """A saved segmentation U-Net, in channels_last as it trained (oneDNN on a CPU, tensor cores on a GPU:
    a forward pass over a demo study's planes 0.09 against 0.13 s here), and its metadata (``reading``: how it
    reads a study)."""
    model, meta = load_model(path, "segmenter", device)
    return model.to(memory_format=torch.channels_last), meta


def save_blend(blend: Blend, path: str | os.PathLike) -> Path:
    """A level-2 blend (`cspine.stacking.Blend`), as plain numbers: no scikit-learn object."""
    return save_checkpoint({"blend": dataclasses.asdict(blend)}, path, "blend")


def load_blend(path: str | os.PathLike) -> Blend:
    """A saved level-2 blend (`save_blend`), checked to hold a model for every target.

    Raises:
        CheckpointError: damaged, of another kind or schema, or missing a target (the file is named).
    """
    saved = load_checkpoint(path, "blend")["blend"]
    missing = [t for t in TARGETS if t not in saved["targets"]]
    if missing:
        raise CheckpointError(
            f"{path}: blend checkpoint without a model for {', '.join(missing)}; run "
            "`python -m cspine blend` again"
        )
    targets = {t: _rebuild(TargetModel, m, Path(path)) for t, m in saved["targets"].items()}
    return dataclasses.replace(_rebuild(Blend, {**saved, "targets": {}}, Path(path)), targets=targets)
