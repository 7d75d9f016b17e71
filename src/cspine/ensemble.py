"""The trained models a run holds, loaded for inference and checked against the config: what `predict`
answers with and `package-kaggle` bundles. Reads checkpoints only, never training code.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cspine.checkpoints import (
    CheckpointError,
    load_blend,
    load_crop_model,
    load_segmenter,
    load_sequence_model,
    load_slice_model,
    load_vertebra_model,
)
from cspine.config import Config, ConfigError, blend_models
from cspine.models import CropNet, SequenceNet, SliceNet
from cspine.runs import Run

log = logging.getLogger(__name__)


@dataclass
class Ensemble:
    """Every fold's slice CNN, the BLSTMs, the blend, and how they read a study (from their checkpoints).

    The k-th CNN sits on ``devices[k % len(devices)]`` (folds spread over the GPUs); everything else on the
    first.
    """

    cnns: dict[int, SliceNet]
    blstms: dict[int, list[tuple[dict, SequenceNet]]]  # {size: BLSTMs}: seq.hidden, and those a blend reads
    hidden: int  # the size that answers without a blend
    inputs: dict  # the CNNs' preprocessing and reading: size, crop, margin, input_size, context
    arch: dict  # the CNNs' architecture: backbone, width, ...
    input: str  # what the BLSTMs read: "features", "probs" or "fracture"
    bins: int
    tta: bool  # the CNNs read each slice mirrored too, as when the BLSTMs' training features were extracted
    segmenters: list[torch.nn.Module] = field(default_factory=list)  # with the vertebra track only
    seg_reading: dict = field(default_factory=dict)  # how they read a study (`cspine.segmenter.reading`)
    vertebra: list[tuple[dict, SequenceNet]] = field(default_factory=list)  # the vertebra track's BiLSTMs
    overall: str = "blstm"  # where the vertebra track takes patient_overall from (`VertebraConfig.overall`)
    crops: list[tuple[dict, CropNet]] = field(default_factory=list)  # the crop track's models, one a fold
    crop_spec: dict = field(default_factory=dict)  # how they cut a vertebra (`cspine.crops.crop_spec`)
    blend: dict | None = None  # the level-2 blend, applied to each fold's models; it answers when present
    devices: list[torch.device] = field(default_factory=lambda: [torch.device("cpu")])


def _one(values: dict, what: str, where: Path):
    """The single value every checkpoint records for ``what``; an error naming the disagreeing files."""
    distinct = {repr(v) for v in values.values()}
    if len(distinct) > 1:
        listing = "; ".join(f"{path}: {value}" for path, value in values.items())
        raise CheckpointError(
            f"{where}: the checkpoints disagree on {what} ({listing}); train them again together"
        )
    return next(iter(values.values()))


def load_ensemble(
    run_dir: str | os.PathLike,
    hidden: int,
    devices: list[torch.device],
    with_vertebra: bool = True,
    with_blend: bool = True,
    with_crop: bool = True,
) -> Ensemble:
    """Loads every ``slice/fold*/best.pt``, the BLSTMs of size ``hidden`` (and of every size the blend reads),
    the vertebra track, the crop track, their segmentation models, and the blend, of a run (or a Kaggle
    bundle).

    The k-th CNN goes to ``devices[k % len(devices)]``; the other models to ``devices[0]``. ``with_vertebra``,
    ``with_crop`` and ``with_blend`` False leave those out (a run whose config turned them off after
    training them).

    Raises:
        FileNotFoundError: no slice CNN or no BLSTM of a size needed.
        CheckpointError: a damaged checkpoint, or checkpoints that disagree on how to read a study.
    """
    run = Run(run_dir)
    device = devices[0]
    cnns, cnn_meta = {}, {}
    for k, (fold, path) in enumerate(run.slice_checkpoints().items()):
        cnns[fold], cnn_meta[path] = load_slice_model(path, devices[k % len(devices)])
    blend = load_blend(run.blend_model) if with_blend and run.blend_model.is_file() else None
    sizes = sorted({hidden, *(blend["sizes"] if blend else [])})
    blstms, blstm_meta = {}, {}
    for size in sizes:
        blstms[size] = []
        for path in run.blstm_checkpoints(size):
            model, meta = load_sequence_model(path, device)
            blstms[size].append((meta, model))
            blstm_meta[path] = meta
    empty = [size for size, models in blstms.items() if not models]
    if not cnns or empty:
        raise FileNotFoundError(
            f"no trained models under {run.root} (slice CNNs: {len(cnns)}, BLSTMs of size "
            f"{', '.join(map(str, empty)) or hidden}: none); run the training stages first"
        )
    ensemble = Ensemble(
        cnns,
        blstms,
        hidden,
        inputs=_one({p: m["inputs"] for p, m in cnn_meta.items()}, "preprocessing", run.root),
        arch=_one({p: m["arch"] for p, m in cnn_meta.items()}, "architecture", run.root),
        input=_one({p: m["input"] for p, m in blstm_meta.items()}, "BLSTM input", run.root),
        bins=_one({p: m["bins"] for p, m in blstm_meta.items()}, "seq.bins", run.root),
        tta=_one({p: m["tta"] for p, m in blstm_meta.items()}, "predict.tta", run.root),
        blend=blend,
        devices=list(devices),
    )
    if with_vertebra and run.vert_models():
        _add_vertebra_track(ensemble, run, device)
    if with_crop and run.crop_models():
        _add_crop_track(ensemble, run, device)
    if not ensemble.segmenters and blend and blend["extents"]:
        _add_segmenters(ensemble, run, device)
    if blend:
        _check_blend(ensemble, run)
    return ensemble


def _add_segmenters(ensemble: Ensemble, run: Run, device: torch.device) -> None:
    """The segmentation models that find each vertebra's slices (for the vertebra track or a blend)."""
    readings = {}
    for path in run.seg_models():
        model, meta = load_segmenter(path, device)
        ensemble.segmenters.append(model)
        readings[path] = meta["reading"]
    if not ensemble.segmenters:
        raise FileNotFoundError(
            f"{run.root}: models that read each vertebra's slices, but no segmentation model "
            "(segment/fold*.pt)"
        )
    ensemble.seg_reading = _one(readings, "segmentation reading", run.root)


def _check_blend(ensemble: Ensemble, run: Run) -> None:
    """The blend reads its folds' models through the very checkpoints it was fitted through (their digests):
    a blend of another run, or of models since trained again or removed, would weigh outputs it never saw."""
    b = ensemble.blend
    if "through" not in b:
        raise CheckpointError(
            f"{run.blend_model}: the blend does not record the checkpoints it was fitted through (made by an "
            "earlier cspine): run `python -m cspine blend` on this run"
        )
    reads = run.blend_reads(
        b["folds"], b["sizes"], b["vertebra"], b["crop"], b["extents"] or b["vertebra"] or b["crop"]
    )
    now = run.digests(reads)
    missing = [path for path, was in b["through"].items() if now.get(path, "missing") == "missing"]
    other = [path for path, was in b["through"].items() if path not in missing and now.get(path) != was]
    other += [path for path in now if path not in b["through"] and now[path] != "missing"]
    if missing or other:
        said = [f"{', '.join(missing)} missing"] if missing else []
        said += [f"{', '.join(other)} not the models it was fitted through"] if other else []
        raise CheckpointError(
            f"{run.blend_model}: the blend reads {'; '.join(said)} (a blend of another run, or models trained "
            "again since): run `python -m cspine blend` on this run"
        )


def _add_vertebra_track(ensemble: Ensemble, run: Run, device: torch.device) -> None:
    """The vertebra track's BiLSTMs and the segmentation models they need to find each vertebra."""
    metas = {}
    for path in run.vert_models():
        model, meta = load_vertebra_model(path, device)
        ensemble.vertebra.append((meta, model))
        metas[path] = meta
    _add_segmenters(ensemble, run, device)
    ensemble.overall = _one({p: m["overall"] for p, m in metas.items()}, "vert.overall", run.root)
    if (
        _one({p: m["tta"] for p, m in metas.items()}, "predict.tta of the vertebra track", run.root)
        != ensemble.tta
    ):
        raise CheckpointError(f"{run.root}: the vertebra track and the BLSTMs read slices differently (tta)")


def _add_crop_track(ensemble: Ensemble, run: Run, device: torch.device) -> None:
    """The crop track's models (one a fold) and the segmentation models that place each vertebra."""
    specs = {}
    for path in run.crop_models():
        model, meta = load_crop_model(path, device)
        ensemble.crops.append((meta, model))
        specs[path] = meta["crops"]
    ensemble.crop_spec = _one(specs, "how crops are cut", run.root)
    if not ensemble.segmenters:
        _add_segmenters(ensemble, run, device)


def check_config(cfg: Config, ensemble: Ensemble) -> None:
    """Raises ConfigError naming every setting of ``cfg`` that contradicts the checkpoints.

    Inference reads its settings from the checkpoints; a config that says otherwise would describe models
    that do not exist, so it is refused rather than silently overridden.
    """
    i, a = ensemble.inputs, ensemble.arch
    pairs = {
        "prepare.size": (cfg.prepare.size, i["size"]),
        "prepare.crop": (cfg.prepare.crop, i["crop"]),
        "prepare.margin": (cfg.prepare.margin, i["margin"]),
        "slice.input_size": (cfg.slice.input_size or cfg.prepare.size, i["input_size"]),
        "slice.context": (cfg.slice.context, i["context"]),
        "slice.backbone": (cfg.slice.backbone, a["backbone"]),
        "slice.width": (cfg.slice.width, a["width"]),
        "seq.input": (cfg.seq.input, ensemble.input),
        "seq.bins": (cfg.seq.bins, ensemble.bins),
        "predict.tta": (cfg.predict.tta, ensemble.tta),
        "vert.enabled": (cfg.vert.enabled, bool(ensemble.vertebra)),
        "crop.enabled": (cfg.crop.enabled, bool(ensemble.crops)),
        **({"vert.overall": (cfg.vert.overall, ensemble.overall)} if ensemble.vertebra else {}),
        **(
            {"the models the blend reads (blend.models)": (blend_models(cfg), ensemble.blend["models"])}
            if cfg.blend.enabled and ensemble.blend
            else {}
        ),
    }
    differ = [
        f"{key}={mine!r} (the models: {theirs!r})" for key, (mine, theirs) in pairs.items() if mine != theirs
    ]
    if differ:
        raise ConfigError(
            "the config contradicts the trained models: "
            + ", ".join(differ)
            + "; predict with the run's own config (the default) or train again"
        )


def check_complete(cfg: Config, ensemble: Ensemble, where: str | os.PathLike) -> None:
    """Raises CheckpointError naming every model the config's folds need and ``where`` lacks.

    A bundle missing one fold's CNN would otherwise predict with the others, moving every answer without a
    word; each trained fold must have its CNN and BLSTMs (and, with the track, its vertebra models), and
    the segmentation its ``seg.folds`` models.
    """
    folds = cfg.folds.trained
    missing = [f"slice/fold{k}/best.pt" for k in folds if k not in ensemble.cnns]
    sources = {meta["source_fold"] for meta, _ in ensemble.blstms[ensemble.hidden]}
    if None not in sources:  # BLSTMs trained within each fold: one set per fold
        missing += [f"seq/h{ensemble.hidden}/fold{k}/*.pt" for k in folds if k not in sources]
    if ensemble.vertebra:
        tracked = {meta["source_fold"] for meta, _ in ensemble.vertebra}
        missing += [f"vertebra/fold{k}/*.pt" for k in folds if k not in tracked]
    if ensemble.crops:
        cropped = {meta["fold"] for meta, _ in ensemble.crops}
        missing += [f"crop/fold{k}/model.pt" for k in folds if k not in cropped]
    if ensemble.segmenters and len(ensemble.segmenters) < cfg.seg.folds:
        missing.append(f"segment/fold*.pt ({len(ensemble.segmenters)} of {cfg.seg.folds})")
    if missing:
        raise CheckpointError(
            f"{where}: models its config's folds need are missing: {', '.join(missing)}; "
            "train them, or package the run again"
        )
    if cfg.blend.enabled and ensemble.blend is None:
        raise CheckpointError(
            f"{Run(where).blend_model}: the blend is missing, and the config submits through it "
            "(blend.enabled); run `python -m cspine blend` on the run, or predict without it "
            "(blend.enabled=false)"
        )
