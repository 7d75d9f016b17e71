"""One configuration for every stage: frozen dataclass defaults, a YAML diff per experiment, overrides.

    cfg = load_config("demo", ["slice.epochs=3", "seq.hidden=256"])  # a shipped config, or a YAML path
    save_config(cfg, out_dir / "config.yaml")

A YAML file holds only what differs from the defaults; an unknown key (in the file or an override) is an
error that names it and lists the valid keys, so a typo never silently trains the wrong model.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from cspine.runs import write_text


class ConfigError(ValueError):
    """An unknown key or a value of the wrong type in a config file or override."""


@dataclass(frozen=True)
class SynthConfig:
    """The synthetic competition generated when no real data is found."""

    n_train: int = 48
    n_test: int = 6
    image_size: int = 160  # real scans are 512; 160 keeps the CPU demo in minutes
    n_slices: int = 0  # slices from the scan's top to T1 (a third of the scans go on into T2); 0 draws them
    # with n_slices 0: drawn from this range (the real scans: 250-450)
    slice_range: tuple[int, ...] = (60, 120)
    # mm of head above the skull base the scans cover, drawn from this range; () starts them at the skull
    # base (8-14 mm). The real scans cover about 250 mm at 0.5-1 mm a slice: (60, 140) gives that
    head_mm: tuple[float, ...] = ()
    reversed_fraction: float = 0.1  # studies whose files are numbered feet to head (the real data: about 10%)
    difficulty: float = 0.5
    box_fraction: float = 0.245  # real data: 235 of 961 positive studies have boxes
    mask_fraction: float = 0.043  # real data: 87 of 2,019 studies have segmentations
    min_masks: int = 12  # but at least this many (all, if fewer): a segmentation network needs a dozen
    seed: int = 0


@dataclass(frozen=True)
class PrepareConfig:
    """The paper's preprocessing and the slice cache."""

    size: int = 384  # the paper's input size
    crop: str = "study"  # "study": one box per study (steady scale for the BLSTM); "slice": the paper's
    margin: float = 0.05  # the paper's 5% on each side of the detected spine
    workers: int = 2  # studies preprocessed in parallel
    # "npy": plain arrays, memory-mapped (fastest to read); "zarr": zstd-compressed, one chunk a slice, about
    # 2.2-3.7x smaller on real CT (benchmarks/bench_cache.py) for ~2 ms more per slice read
    format: str = "npy"
    # a subset of the training studies, for a disk or a time limit (Kaggle's 20 GB): 0 = all, a number >= 1
    # = that many studies, below 1 = that share; drawn stratified on the eight targets, and every study with
    # a segmentation is kept (the segment stage trains on them)
    studies: float = 0
    study_list: str = ""  # or a file of StudyInstanceUIDs (one per line, or a CSV with that column)


@dataclass(frozen=True)
class FoldConfig:
    n_splits: int = 5
    seed: int = 42
    folds: tuple[int, ...] = ()  # folds to train; () trains all

    @property
    def trained(self) -> list[int]:
        """The folds a run trains (and so the folds whose models inference needs)."""
        return list(self.folds) if self.folds else list(range(self.n_splits))


@dataclass(frozen=True)
class SliceConfig:
    """Stage 1: the slice CNN (the paper: ResNet-50, Adam 1e-3, StepLR 5/0.2, batch 16, 50 epochs)."""

    backbone: str = "resnet50"
    pretrained_file: str = (
        ""  # local weights only (a .pth/.safetensors path); "" = random init as in the paper
    )
    input_size: int = 0  # 0 trains at the cache's size; smaller values resize on the fly
    context: int = 0  # neighbouring slices each side stacked as channels (2.5D); 0 = the paper's single slice
    width: float = 1.0  # channel multiplier for a timm ResNet backbone (0.5: a quarter of the arithmetic)
    epochs: int = 50
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.0
    schedule: str = "step"  # "step": the paper's StepLR (×gamma every step_size epochs); "cosine": per update
    step_size: int = 5  # StepLR epochs
    gamma: float = 0.2
    warmup_epochs: float = 0.0  # linear warm-up from lr/100 (either schedule)
    min_lr: float = 0.0  # where "cosine" ends
    dropout: float = 0.3
    patience: int = 8  # early stopping on validation loss, in epochs (select="val_loss")
    # which epoch's weights become best.pt, the model extract and predict use: "val_loss", the lowest
    # validation loss (the paper's early stopping); "last", the final epoch's, chosen without looking at the
    # held-out fold (whose out-of-fold scores the BLSTM and the report then use)
    select: str = "val_loss"
    accum_steps: int = 1
    clip_grad: float = 0.0  # 0 = no clipping
    amp: bool = True  # bf16/fp16 autocast on CUDA; ignored on CPU
    channels_last: bool = True  # NHWC: faster with AMP on a GPU, and with oneDNN on a CPU
    ema: bool = False
    ema_decay: float = 0.998
    workers: int = 2
    balance: bool = True  # sample positive slices at positive_fraction (fractured slices are ~3% of the data)
    positive_fraction: float = 0.5  # with balance: the share of fractured slices in each epoch
    height_matched: float = (
        0.0  # with balance: share of negatives drawn at the positives' heights in the study
    )
    hflip: float = 0.5  # the paper's horizontal flip
    rotate: float = 10.0  # the paper's ±10° rotation
    extra_aug: bool = False  # brightness/contrast, shift-scale, noise on top of the paper's
    steps_per_epoch: int = 0  # 0 = one pass over the (sampled) training slices
    val_max_slices: int = 0  # 0 = every validation slice
    aux_weight: float = 0.5  # weight of the per-vertebra heads against the slice-fracture head
    box_weight: float = 0.0  # >0 adds a box-map head trained on the competition's boxes (0 = the paper's CNN)
    # where fractured studies without boxes get slice labels: "boxes" leaves them unknown (the paper's
    # labels, a quarter of the real positives); "vertebrae" marks the slices of each fractured vertebra,
    # from the `segment` stage (true masks where a study has one)
    labels: str = "boxes"
    seed: int = 0


@dataclass(frozen=True)
class SegConfig:
    """Stage `segment`: a 2.5D U-Net that labels every voxel of a study C1..C7 (or T1, or nothing).

    It reads sagittal planes of the cached study: on an axial slice C3 looks like C6, while a sagittal
    plane shows the column from the skull down, so the network can count.
    """

    encoder: str = "resnet10t"  # a timm encoder (segmentation-models-pytorch's "tu-" family)
    context: int = 2  # neighbouring sagittal planes on each side, as channels
    row_mm: float = 2.0  # the scan's length resampled at this many mm a row of the sagittal plane (every vertebra the same rows in every study)
    folds: int = 3  # folds over the masked studies: each one's Dice comes from a model that never saw it
    steps: int = 500  # optimizer steps per fold
    batch_size: int = 16
    lr: float = 2e-3
    plane_stride: int = 2  # predict every n-th sagittal plane (neighbours copy it): a vertebra spans many
    # count the vertebral bodies between the discs from C2 down (`cspine.segmenter.count_levels`), each label
    # reaching `count_margin` of a vertebra's pitch past its own bodies (a real arch overlaps the next body)
    count: bool = True
    count_margin: float = 0.2
    min_pixels: int = 8  # a vertebra is present on an axial slice from this many of its pixels (cache size)
    amp: bool = True  # mixed precision on a GPU (bf16 where supported); ignored on CPU
    seed: int = 0
    # self-training: in round 2 each fold's model goes on training from its round-1 weights on its masked
    # studies and on the unmasked studies that its round-1 model labelled and whose labels pass
    # `cspine.segmenter.check_vertebrae` with at least `pseudo_confidence` (`cspine.segment`); 1: masks only
    rounds: int = 1
    pseudo_steps: int = 0  # round 2's optimizer steps a fold (0: `steps`)
    pseudo_confidence: float = 0.8  # least mean winning probability over a study's spine (demo: 0.73-0.84)
    pseudo_studies: int = 400  # the most unmasked studies a fold labels (each held in memory while it trains)

    @property
    def least_masks(self) -> int:
        """Masked studies the folds need: two a fold, and two folds at least."""
        return 2 * max(self.folds, 2)


@dataclass(frozen=True)
class SeqConfig:
    """Stage 2: the BLSTM over a study's slice features (the paper: Adam 1e-6, 100 epochs, batch 4)."""

    hidden: int = 128  # the paper's Table 3 compares 96, 128, 256
    compare_hidden: tuple[int, ...] = (96, 128, 256)  # sizes `train-seq` also trains, for Table 3
    layers: int = 1
    dropout: float = 0.2
    epochs: int = 100
    batch_size: int = 4
    lr: float = 1e-6
    weight_decay: float = 0.0
    patience: int = 15
    stop_fraction: float = (
        0.2  # training studies held back to choose the epoch (never the scored studies); 0 = all epochs
    )
    input: str = (
        "features"  # "features": CNN features (the paper); "probs": its 15 outputs; "fracture": output 0 only
    )
    # "own_fold": fold k's BLSTMs train in `inner_folds` inner folds on fold k's studies, read by CNN k, the
    # CNN they are scored through (one CNN's scale; the only choice for "features"); "other_folds" ("probs"
    # and "fracture" only): fold k's BLSTM trains on every other fold's studies, read by those folds' CNNs
    train_on: str = "own_fold"
    inner_folds: int = 4  # with train_on="own_fold"
    loss: str = (
        "competition"  # "case": plain BCE on the case labels (the paper); "competition": the metric's weights
    )
    bins: int = 0  # 0 = whole studies (the paper); >0 = each study max-pooled into this many runs of slices
    seed: int = 0

    @property
    def sizes(self) -> tuple[int, ...]:
        """The BLSTM sizes a run trains: those the report compares, then the one `predict` uses."""
        return tuple(dict.fromkeys((*self.compare_hidden, self.hidden)))


@dataclass(frozen=True)
class VertebraConfig:
    """The vertebra track: each vertebra's own fracture probability, from the slices it spans.

    Stage 1's CNN reads every slice already (out of fold, in `extract`); this track takes its outputs on
    the slices of one vertebra (the `segment` stage's extent, ``margin`` slices wider), pools them into
    ``bins`` runs, and a small BiLSTM, shared by the seven vertebrae (each told which it reads), gives
    that vertebra's probability.
    """

    enabled: bool = False  # train it (the segment stage then runs too) and predict with it
    margin: int = 1  # slices added above and below each vertebra's extent
    bins: int = 8  # each vertebra's slices max-pooled into this many runs
    hidden: int = 32
    dropout: float = 0.1
    epochs: int = 40
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.01
    inner_folds: int = 4  # trained within each fold, through that fold's CNN, as the BLSTMs (seq.train_on)
    # where patient_overall comes from: "blstm", the study BLSTM of size seq.hidden (on the demo it ranks
    # studies better: case AUC 0.819 against 0.764, loss 0.407 against 0.455), or "vertebrae", 1 − Π(1 − p_k)
    overall: str = "blstm"
    seed: int = 0


@dataclass(frozen=True)
class CropConfig:
    """The crop track: each vertebra read at its own resolution, as every top solution of the competition did.

    For vertebra k of a study, ``slices`` slices spaced evenly over its segmented extent (``margin`` of its
    height wider on each side) are cut from the study's HU volume, not from the cache, around k's in-plane
    box (``margin`` wider), resized to ``size`` px: channels are the bone window of the slice and its
    ``context`` neighbours on each side, and k's own segmentation. A timm CNN reads each slice, a BiGRU
    the slices in order, and one logit per vertebra comes out (`cspine.models.CropNet`), trained on the
    study's own C1..C7 labels.
    """

    enabled: bool = False  # cut the crops, train the crop models, blend and predict with them
    size: int = 64  # crop side, px (the winners: 256-512)
    slices: int = 12  # slices per vertebra (the winners: 15-40)
    context: int = 1  # neighbouring slices on each side, as channels (the 1st place: 2)
    margin: float = 0.15  # of the vertebra's height (along z) and box (in-plane), added on each side
    backbone: str = "resnet10t"  # any timm model
    width: float = 1.0  # channel multiplier of a timm ResNet (`cspine.models.width_args`)
    pretrained_file: str = (
        ""  # local weights for the backbone ("" trains from scratch; nothing is downloaded)
    )
    hidden: int = 64  # the BiGRU's size per direction
    epochs: int = 12
    batch_size: int = 16  # vertebrae per step (each `slices` images)
    lr: float = 1e-3
    weight_decay: float = 0.01
    amp: bool = True  # mixed precision on a GPU (bf16 at compute capability 8 and above, fp16 below)
    channels_last: bool = True
    workers: int = 0  # processes that cut the crops (0: every core)
    loader_workers: int = 0  # DataLoader processes that read the stored crops in training (0: in-process)
    steps_per_epoch: int = 0  # 0 = every training vertebra once an epoch
    seed: int = 0


BLEND_MODELS = ("blstm", "cnn", "vertebra", "crop")  # what `blend.models` may name (`cspine.blend`)


@dataclass(frozen=True)
class BlendConfig:
    """Level 2: per target, a logistic regression over every model's out-of-fold outputs (`cspine.blend`).

    Fold k is scored by a blend fitted on the other folds' studies; `predict` applies the blend fitted on
    every study to each fold's models and averages the folds.
    """

    enabled: bool = True  # fit it, and let it write the submission
    # whose outputs it reads: "blstm" (every size the run trains), "cnn" (the slice CNN pooled over the
    # study and over each vertebra's slices), "vertebra" (the vertebra track, with vert.enabled), "crop"
    # (the crop track, with crop.enabled)
    models: tuple[str, ...] = BLEND_MODELS
    # inverse L2 strength on standardised log-odds, the metric's weights normalised to mean 1: on the demo
    # 0.3 and 1 squeezed the probabilities towards the prior (loss 0.397, 0.366), 3 gave 0.360, 10 gave 0.370
    C: float = 3.0
    top_k: int = 5  # slices averaged for the "top" pooling of the slice-fracture output
    margin: int = 1  # slices added on each side of a vertebra's extent for the CNN's per-vertebra inputs
    # patient_overall never below the largest vertebra probability (a broken vertebra is a broken study)
    floor: bool = True
    # every input standardised within its fold first: each fold's models give outputs on scales of their own
    # (on the demo, the two CNNs' max-pooled log-odds spread 2.5 and 1.2), and a blend fitted through one
    # fold's models otherwise misreads the other's
    per_fold: bool = True
    seed: int = 0


@dataclass(frozen=True)
class PredictConfig:
    """How the slice CNN reads a study in `extract` and `predict` alike, and the submission's clip."""

    clip: float = 1e-4  # probabilities clipped to [clip, 1 - clip]
    batch_size: int = 32
    # `extract` reads each slice as it is and mirrored left-right and averages the two (2× the CNN time);
    # `predict` then does the same, because the BLSTMs record whether their training features were made so
    tta: bool = False
    # `predict`: processes that decode and preprocess the next studies while the models work (0: every core)
    workers: int = 0
    # the share of present test studies that may fail (and get the prior) before `predict` refuses to write a
    # submission: a fault that hits every study (a codec missing, a GPU problem) must not score as the prior
    max_failed: float = 0.1
    # when no test study listed in test.csv is present (Kaggle's public rerun), predict this many studies of
    # train_images/ with the real models and print the time, device and failures: the hidden rerun's check
    self_test: int = 3


@dataclass(frozen=True)
class Config:
    """Everything a run needs. `name` labels outputs; `device` is "auto", "cpu" or "cuda"."""

    name: str = "default"
    device: str = "auto"
    # the data the config is made for: "synthetic" (the CPU demos: `run` refuses them on the real data),
    # "real", or "any"
    meant_for: str = "any"
    synth: SynthConfig = field(default_factory=SynthConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    folds: FoldConfig = field(default_factory=FoldConfig)
    seg: SegConfig = field(default_factory=SegConfig)
    slice: SliceConfig = field(default_factory=SliceConfig)
    seq: SeqConfig = field(default_factory=SeqConfig)
    vert: VertebraConfig = field(default_factory=VertebraConfig)
    crop: CropConfig = field(default_factory=CropConfig)
    blend: BlendConfig = field(default_factory=BlendConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)


def _keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key a config class accepts."""
    out = []
    for name, kind in typing.get_type_hints(cls).items():
        out += _keys(kind, f"{prefix}{name}.") if dataclasses.is_dataclass(kind) else [prefix + name]
    return out


def _coerce(value: Any, kind: Any, key: str) -> Any:
    origin = typing.get_origin(kind)
    try:
        if kind is bool:
            if isinstance(value, str):
                if value.lower() in ("true", "1", "yes", "on"):
                    return True
                if value.lower() in ("false", "0", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if kind in (int, float, str):
            if kind is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return kind(value)
        if origin is tuple:
            (item,) = {a for a in typing.get_args(kind) if a is not Ellipsis}
            if isinstance(value, str):
                value = [v for v in value.strip("()[] ").split(",") if v.strip()]
            return tuple(_coerce(v, item, key) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: {value!r} is not a valid {getattr(kind, '__name__', kind)}") from None
    return value


def _apply(cfg: Any, updates: dict, prefix: str, source: str) -> Any:
    changes = {}
    hints = typing.get_type_hints(type(cfg))
    names = {f.name for f in dataclasses.fields(cfg)}
    for key, value in updates.items():
        if key not in names:
            raise ConfigError(
                f"{source}: unknown key {prefix}{key!r}; valid keys: " + ", ".join(_keys(type(cfg), prefix))
            )
        kind = hints[key]
        if dataclasses.is_dataclass(kind):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {prefix}{key} is a section; give it keys, not {value!r}")
            changes[key] = _apply(getattr(cfg, key), value, f"{prefix}{key}.", source)
        else:
            changes[key] = _coerce(value, kind, prefix + key)
    return dataclasses.replace(cfg, **changes)


def parse_overrides(overrides: list[str]) -> dict:
    """["slice.epochs=3", "name=x"] → {"slice": {"epochs": "3"}, "name": "x"} (values typed later)."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, value = item.split("=", 1)
        node = tree
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
        try:
            node[leaf] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: not a valid value ({str(exc).splitlines()[0]})") from None
    return tree


def shipped_configs() -> dict[str, Path]:
    """{name: path} of the configs inside the package (``cspine/configs/*.yaml``)."""
    folder = Path(str(resources.files("cspine") / "configs"))
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}


def config_path(name_or_path: str | os.PathLike) -> Path:
    """A YAML file: a path that exists, else a shipped config by name (``demo`` or ``demo.yaml``).

    Works from any working directory and from an installed wheel.

    Raises:
        ConfigError: neither a file nor a shipped name; lists the shipped names.
    """
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = shipped_configs()
    stem = path.name.removesuffix(".yaml")
    if stem in shipped and path.parent == Path("."):
        return shipped[stem]
    raise ConfigError(
        f"config {str(name_or_path)!r} is neither a file nor a shipped config; shipped: {', '.join(shipped)}"
    )


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML diff at ``path`` (a file, or a shipped config's name), then ``key=value`` overrides."""
    cfg = Config()
    if path:
        path = config_path(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a config is a mapping of keys, not {type(data).__name__}")
        cfg = _apply(cfg, data, "", str(path))
    if overrides:
        cfg = _apply(cfg, parse_overrides(overrides), "", "command line")
    check_ranges(cfg)
    return cfg


# The range each number must lie in (inclusive; None: unbounded), checked when a config is loaded, so that
# a mistake is one line at once and not a traceback after hours of training.
RANGES = {
    "synth.n_train": (2, None),
    "synth.n_test": (1, None),
    "synth.image_size": (32, 2048),
    "synth.n_slices": (0, None),
    "synth.min_masks": (0, None),
    "synth.box_fraction": (0, 1),
    "synth.reversed_fraction": (0, 1),
    "synth.mask_fraction": (0, 1),
    "prepare.size": (16, 2048),
    "prepare.workers": (1, None),
    "prepare.margin": (0, 0.5),
    "folds.n_splits": (2, None),
    "slice.epochs": (1, None),
    "slice.batch_size": (1, None),
    "slice.workers": (0, None),
    "seg.folds": (2, None),
    "seg.steps": (1, None),
    "seg.rounds": (1, 2),
    "seg.pseudo_steps": (0, None),
    "seg.pseudo_confidence": (0.0, 1.0),
    "seg.pseudo_studies": (1, None),
    "seg.row_mm": (0.25, 10.0),
    "seg.count_margin": (0.0, 1.0),
    "seq.inner_folds": (2, None),
    "vert.inner_folds": (2, None),
    "crop.size": (16, 1024),
    "crop.slices": (1, None),
    "crop.context": (0, 8),
    "crop.margin": (0, 1),
    "crop.epochs": (1, None),
    "crop.batch_size": (1, None),
    "crop.workers": (0, None),
    "crop.loader_workers": (0, None),
    "crop.steps_per_epoch": (0, None),
    "blend.C": (1e-6, None),
    "blend.top_k": (1, None),
    "blend.margin": (0, None),
    "predict.workers": (0, None),
    "predict.batch_size": (1, None),
    "predict.max_failed": (0, 1),
    "predict.self_test": (0, None),
    "predict.clip": (0, 0.5),
}


def blend_models(cfg: Config) -> list[str]:
    """The models whose outputs the blend reads: ``blend.models``, less the tracks the run does not train."""
    trained = {"vertebra": cfg.vert.enabled, "crop": cfg.crop.enabled}
    return [m for m in cfg.blend.models if trained.get(m, True)]


def check_blend_models(cfg: Config) -> None:
    """Refuses, when the config loads, a blend that names an unknown model or reads none of the run's."""
    unknown = sorted(set(cfg.blend.models) - set(BLEND_MODELS))
    if unknown or not cfg.blend.models:
        raise ConfigError(f"blend.models={list(cfg.blend.models)}: name one or more of {list(BLEND_MODELS)}")
    if cfg.blend.enabled and not blend_models(cfg):
        raise ConfigError(
            f"blend.models={list(cfg.blend.models)} names only tracks this config does not train "
            "(vert.enabled, crop.enabled): the blend would read nothing and submit one constant a target; "
            "add blstm or cnn, or switch the track on"
        )


def check_ranges(cfg: Config) -> None:
    """Raises ConfigError naming the first setting outside its range (`RANGES`)."""
    for key, (lo, hi) in RANGES.items():
        value = config_value(cfg, key)
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            bounds = f"at least {lo}" if hi is None else f"from {lo} to {hi}"
            raise ConfigError(f"{key}={value!r}: must be {bounds}")
    check_blend_models(cfg)
    head = cfg.synth.head_mm
    if head and (len(head) != 2 or not 0 < head[0] <= head[1]):
        raise ConfigError(f"synth.head_mm={list(head)}: two lengths in mm, the least first, or []")
    lo_hi = cfg.synth.slice_range
    if len(lo_hi) != 2 or not 4 <= lo_hi[0] <= lo_hi[1]:
        raise ConfigError(
            f"synth.slice_range={list(lo_hi)}: two numbers of slices, at least 4, the least first"
        )


def config_dict(cfg: Config) -> dict:
    """The resolved config as plain data (tuples as lists), for YAML and logs."""

    def plain(value):
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        return value

    return plain(dataclasses.asdict(cfg))


def save_config(cfg: Config, path: str | os.PathLike) -> Path:
    """Writes the resolved config (every key) beside a stage's outputs."""
    return write_text(path, yaml.safe_dump(config_dict(cfg), sort_keys=False))


def diff_from_defaults(cfg: Config) -> dict:
    """Only the keys that differ from the defaults (what an experiment YAML holds)."""

    def diff(a: dict, b: dict) -> dict:
        out = {}
        for key, value in a.items():
            if isinstance(value, dict):
                sub = diff(value, b[key])
                if sub:
                    out[key] = sub
            elif value != b[key]:
                out[key] = value
        return out

    return diff(config_dict(cfg), config_dict(Config()))


# Settings that shape no artifact of a run folder: how fast and where it runs, which folds one call trains,
# how the submission is clipped (predict runs anew each time), and the synthetic data's recipe (the data
# folder records its own, `cspine.synthetic.synthetic_settings`).
RUNTIME_KEYS = (
    "name",
    "device",
    "meant_for",
    "prepare.workers",
    "predict.workers",
    "predict.max_failed",
    "predict.self_test",
    "seg.amp",
    "slice.workers",
    "crop.workers",
    "crop.loader_workers",
    "slice.amp",
    "slice.channels_last",
    "predict.batch_size",
    "predict.clip",
    "folds.folds",
    "synth.",
)
# Settings whose stages compare them with what they made and redo their work when they differ.
REDONE_KEYS = ("seq.", "vert.", "crop.", "blend.", "predict.tta")


def changed_keys(old: Config, new: Config) -> list[str]:
    """Dotted keys whose values differ between two configs."""

    def flat(tree: dict, prefix: str = "") -> dict:
        out = {}
        for key, value in tree.items():
            out.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
        return out

    a, b = flat(config_dict(old)), flat(config_dict(new))
    return [key for key in a if a[key] != b[key]]


def is_free(key: str) -> bool:
    """Whether a setting may change in an existing run: it shapes nothing kept, or its stage redoes itself."""
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in (*RUNTIME_KEYS, *REDONE_KEYS))


def check_unchanged(made: Config, wanted: Config, where: str, shaped=lambda key: True) -> None:
    """Refuses settings that differ from those ``where`` was made with and cannot change there.

    Args:
        made: the config recorded with the artifact(s).
        wanted: the config asked for now.
        where: what was made, for the message (a run folder, a cache, a fold under way).
        shaped: which dotted keys the artifact depends on; `is_free` keys may always change.

    Raises:
        ConfigError: naming every such key, with the value asked for and the value it was made with.
    """
    fixed = [key for key in changed_keys(made, wanted) if not is_free(key) and shaped(key)]
    if fixed:
        listing = ", ".join(
            f"{key}={config_value(wanted, key)!r} (made with {config_value(made, key)!r})" for key in fixed
        )
        raise ConfigError(
            f"{where} was made with other settings: {listing}; use another run folder "
            "(--out, or name=...) or delete it"
        )


def config_value(cfg: Config, key: str):
    """The value of a dotted key ("slice.epochs")."""
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value
