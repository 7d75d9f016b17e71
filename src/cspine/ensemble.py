"""The trained models a run holds, loaded for inference and checked against the config: what `predict`
answers with and `package-kaggle` bundles. Reads checkpoints only, never training code.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cspine import TARGETS, VERTEBRAE
from cspine.checkpoints import (
    CheckpointError,
    CropMeta,
    SequenceMeta,
    VertebraMeta,
    load_blend,
    load_crop_model,
    load_segmenter,
    load_sequence_model,
    load_slice_model,
    load_vertebra_model,
)
from cspine.config import Config, ConfigError, blend_models, config_value
from cspine.crops import CropSpec
from cspine.inputs import SliceReading
from cspine.models import CropNet, SequenceNet, SliceNet
from cspine.runs import Run
from cspine.segmenter import SegReading
from cspine.stacking import Blend

log = logging.getLogger(__name__)

# What can answer a target: the blend, the paper track's BLSTM, or a track (C1..C7; patient_overall
# as 1 − Π(1 − p_k) of its vertebrae)
BLEND, BLSTM, VERTEBRA, CROP = "blend", "blstm", "vertebra", "crop"


def answering(blend: bool, vertebra: bool, crop: bool, overall: str) -> dict[str, str]:
    """{target: the model that answers it}: the one rule `predict` submits by and the report names.

    With a blend, the blend answers everything. Without, the BLSTM answers, and a track gives C1..C7: the
    crop track where there is one, else the vertebra track; patient_overall then comes from the BLSTM
    (``overall="blstm"``) or from the track's 1 − Π(1 − p_k) (``overall="vertebrae"``).
    """
    if blend:
        return dict.fromkeys(TARGETS, BLEND)
    track = CROP if crop else VERTEBRA if vertebra else None
    if track is None:
        return dict.fromkeys(TARGETS, BLSTM)
    return {TARGETS[0]: BLSTM if overall == "blstm" else track, **dict.fromkeys(VERTEBRAE, track)}


@dataclass
class Ensemble:
    """Every fold's slice CNN, the BLSTMs, the tracks, the blend, and how they read a study (from their
    checkpoints).

    The k-th CNN sits on ``devices[k % len(devices)]`` (folds spread over the GPUs); everything else on the
    first.
    """

    cnns: dict[int, SliceNet]
    # {size: BLSTMs}: seq.hidden, and those a blend reads
    blstms: dict[int, list[tuple[SequenceMeta, SequenceNet]]]
    hidden: int  # the size that answers without a blend
    reading: SliceReading  # how the CNNs read a study
    arch: dict  # the CNNs' architecture: backbone, width, ...
    input: str  # what the BLSTMs read: "features", "probs" or "fracture"
    bins: int
    tta: bool  # the CNNs read each slice mirrored too, as when the BLSTMs' training features were extracted
    # with a track, or a blend that reads each vertebra's slices
    segmenters: list[torch.nn.Module] = field(default_factory=list)
    seg_reading: SegReading | None = None  # how they read a study
    # the vertebra track's BiLSTMs
    vertebra: list[tuple[VertebraMeta, SequenceNet]] = field(default_factory=list)
    overall: str = "blstm"  # where a track takes patient_overall from (`VertebraConfig.overall`)
    crops: list[tuple[CropMeta, CropNet]] = field(default_factory=list)  # the crop track's models, one a fold
    crop_spec: CropSpec | None = None  # how they cut a vertebra
    blend: Blend | None = None  # the level-2 blend, applied to each fold's models; it answers when present
    devices: list[torch.device] = field(default_factory=lambda: [torch.device("cpu")])

    def answers(self) -> dict[str, str]:
        """{target: the model that answers it} (`answering`), of the models loaded."""
        return answering(self.blend is not None, bool(self.vertebra), bool(self.crops), self.overall)


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
    sizes = sorted({hidden, *(blend.sizes if blend else [])})
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
        reading=_one({p: m.reading for p, m in cnn_meta.items()}, "preprocessing", run.root),
        arch=_one({p: cnns[m.fold].arch for p, m in cnn_meta.items()}, "architecture", run.root),
        input=_one({p: m.input for p, m in blstm_meta.items()}, "BLSTM input", run.root),
        bins=_one({p: m.bins for p, m in blstm_meta.items()}, "seq.bins", run.root),
        tta=_one({p: m.tta for p, m in blstm_meta.items()}, "predict.tta", run.root),
        blend=blend,
        devices=list(devices),
    )
    if with_vertebra and run.vert_models():
        _add_vertebra_track(ensemble, run, device)
    if with_crop and run.crop_models():
        _add_crop_track(ensemble, run, device)
    if not ensemble.segmenters and blend and blend.extents:
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
        readings[path] = meta.reading
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
    now = run.digests(run.blend_reads(b.folds, b.sizes, b.vertebra, b.crop, b.segmented))
    missing = [path for path, was in b.through.items() if now.get(path, "missing") == "missing"]
    other = [path for path, was in b.through.items() if path not in missing and now.get(path) != was]
    other += [path for path in now if path not in b.through and now[path] != "missing"]
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
    ensemble.overall = _one({p: m.overall for p, m in metas.items()}, "vert.overall", run.root)
    if (
        _one({p: m.tta for p, m in metas.items()}, "predict.tta of the vertebra track", run.root)
        != ensemble.tta
    ):
        raise CheckpointError(f"{run.root}: the vertebra track and the BLSTMs read slices differently (tta)")


def _add_crop_track(ensemble: Ensemble, run: Run, device: torch.device) -> None:
    """The crop track's models (one a fold) and the segmentation models that place each vertebra."""
    specs = {}
    for path in run.crop_models():
        model, meta = load_crop_model(path, device)
        ensemble.crops.append((meta, model))
        specs[path] = meta.spec
    ensemble.crop_spec = _one(specs, "how crops are cut", run.root)
    if not ensemble.segmenters:
        _add_segmenters(ensemble, run, device)


def made_with(ensemble: Ensemble) -> dict[str, object]:
    """{config key: its value in the loaded models}: every setting a trained model was made with and reads a
    study by. A track or a blend that is not loaded contributes its ``enabled`` alone."""
    e, r = ensemble, ensemble.reading
    made = {
        "prepare.size": r.size,
        "prepare.crop": r.crop,
        "prepare.margin": r.margin,
        "slice.input_size": r.input_size,
        "slice.context": r.context,
        "slice.backbone": e.arch["backbone"],
        "slice.width": e.arch["width"],
        "seq.input": e.input,
        "seq.bins": e.bins,
        "predict.tta": e.tta,
        "vert.enabled": bool(e.vertebra),
        "crop.enabled": bool(e.crops),
    }
    if e.vertebra:
        meta = e.vertebra[0][0]
        made.update({"vert.overall": e.overall, "vert.margin": meta.margin, "vert.bins": meta.bins})
    if e.crops:
        arch = e.crops[0][1].arch
        made.update({f"crop.{key}": value for key, value in dataclasses.asdict(e.crop_spec).items()})
        made.update(
            {"crop.backbone": arch["backbone"], "crop.width": arch["width"], "crop.hidden": arch["hidden"]}
        )
    if e.segmenters:
        made.update({f"seg.{key}": value for key, value in dataclasses.asdict(e.seg_reading).items()})
        made["seg.encoder"] = e.segmenters[0].arch["encoder"]
    if e.blend:
        b = e.blend
        made.update(
            {
                "blend.models": b.models,
                "blend.top_k": b.top_k,
                "blend.margin": b.margin,
                "blend.floor": b.floor,
            }
        )
    return made


def _setting(cfg: Config, key: str):
    """``cfg``'s value of a key `made_with` lists, as the models record it."""
    if key == "slice.input_size":
        return cfg.slice.input_size or cfg.prepare.size
    if key == "blend.models":
        return blend_models(cfg)
    return config_value(cfg, key)


def check_config(cfg: Config, ensemble: Ensemble) -> None:
    """Raises ConfigError naming every setting of ``cfg`` that contradicts the checkpoints (`made_with`).

    Inference reads its settings from the checkpoints; a config that says otherwise would describe models
    that do not exist, so it is refused rather than silently overridden. The blend's settings are checked
    where the config submits through it (``blend.enabled``).
    """
    made = made_with(ensemble)
    if not cfg.blend.enabled:
        made = {key: value for key, value in made.items() if not key.startswith("blend.")}
    differ = [
        f"{key}={_setting(cfg, key)!r} (the models: {theirs!r})"
        for key, theirs in made.items()
        if _setting(cfg, key) != theirs
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
    sources = {meta.fold for meta, _ in ensemble.blstms[ensemble.hidden]}
    if None not in sources:  # BLSTMs trained within each fold: one set per fold
        missing += [f"seq/h{ensemble.hidden}/fold{k}/*.pt" for k in folds if k not in sources]
    if ensemble.vertebra:
        tracked = {meta.fold for meta, _ in ensemble.vertebra}
        missing += [f"vertebra/fold{k}/*.pt" for k in folds if k not in tracked]
    if ensemble.crops:
        cropped = {meta.fold for meta, _ in ensemble.crops}
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
