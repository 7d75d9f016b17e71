"""Stage `segment`: which vertebra every voxel of a study belongs to, from a 2.5D U-Net on sagittal planes.

    python -m cspine segment --config demo

On an axial slice C3 looks like C6; a sagittal plane shows the column from the skull base down, so a
network can count. The U-Net (segmentation-models-pytorch, a timm encoder) reads one sagittal plane of the
cached study with ``seg.context`` planes on each side as channels (three windows each), the study's
slices resampled to ``seg.row_mm`` mm a row (every vertebra the same height in every scan), and labels each
pixel background, C1..C7 or T1; its labels are then kept to the vertebral bodies it counts between the
discs (``seg.count``, `cspine.segmenter.count_levels`).

It trains on the studies that have a segmentation (``cache/<uid>.mask.npy``), in ``seg.folds`` folds at
study level. A masked study is segmented by the fold model that did not train on it (its Dice is out of
fold); every other study by the mean of all fold models. Under torchrun it behaves like `train-slices`:
every rank draws its own batch of planes into one DistributedDataParallel model (the global batch is
``seg.batch_size`` × ranks), rank 0 saves, and the studies are segmented in shares, one per rank, gathered
on rank 0, which writes the tables. Writes ``<run>/segment/``:
- ``fold<k>.pt``: the fold models;
- ``vertebrae.csv``: per cached slice, which of C1..C7 it shows and its level (the vertebra with most pixels);
- ``extents.csv``: per study and vertebra, its slices (``z0``..``z1``, orders, inclusive) and in-plane box
  (``y0, y1, x0, x1``, cache pixels, exclusive ends);
- ``dice.csv``: out-of-fold Dice per vertebra of every masked study;
- ``checks.csv``: per study, whether its vertebrae were counted between the discs (`cspine.segmenter.
  count_levels`; the network's own labels where its spine cannot be counted), whether they pass
  `cspine.segmenter.check_vertebrae` (all seven, in order, of plausible heights, no gap), and what fails; a
  failing study's slices are not labelled from its vertebrae (`slice.labels: vertebrae`);
- ``labels/<uid>.npz``: every study's labels in the cache's frame (compressed; the crop track cuts from them).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F
from sklearn.model_selection import KFold

from cspine import VERTEBRAE
from cspine.cache import load_study_images, read_meta
from cspine.checkpoints import SegmenterMeta, load_segmenter, save_model
from cspine.config import Config, SegConfig
from cspine.progress import progress
from cspine.runs import Run, write_csv
from cspine.runtime import Runtime, amp_dtype, autocast, init_distributed, seed_everything
from cspine.segmenter import (
    build_segmenter,
    check_vertebrae,
    dice_per_vertebra,
    padded_rows,
    plane_labels,
    plane_probabilities,
    plane_rows,
    plane_width,
    reading,
    sagittal_planes,
    save_labels,
    slice_levels,
    spine_confidence,
    vertebra_extents,
)
from cspine.training import distributed, mixed_precision, update

log = logging.getLogger(__name__)


def sagittal_labels(mask: np.ndarray, xs: np.ndarray, rows: int, pad_to: int) -> torch.Tensor:
    """long [B, pad_to, W]: the labels of sagittal planes ``xs`` of a mask uint8 [N, S, S], resampled (nearest)
    to ``rows`` rows as `sagittal_planes` resamples the images, background below."""
    planes = torch.from_numpy(np.ascontiguousarray(mask[:, :, xs].transpose(2, 0, 1)))[:, None].float()
    labels = F.interpolate(planes, size=(rows, plane_width(mask.shape[1])), mode="nearest")[:, 0].long()
    return F.pad(labels, (0, 0, 0, pad_to - rows))


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy plus multiclass soft Dice: the small vertebrae count as much as the background."""
    from segmentation_models_pytorch.losses import DiceLoss

    return F.cross_entropy(logits, target) + DiceLoss(mode="multiclass")(logits, target)


def _columns(rng: np.random.Generator, mask: np.ndarray, n: int) -> np.ndarray:
    """Sagittal planes to train on: mostly through the spine, a fifth anywhere (so the rest reads as background)."""
    spine = np.flatnonzero(mask.any(axis=(0, 1)))
    anywhere = rng.integers(0, mask.shape[2], n)
    if not len(spine):
        return anywhere
    return np.where(rng.random(n) < 0.8, rng.choice(spine, n), anywhere)


def train_segmenter(
    studies: dict[str, tuple[np.ndarray, np.ndarray, float]],
    seg: SegConfig,
    rt: Runtime,
    seed: int,
    desc: str = "segment",
    steps: int | None = None,
    start: dict | None = None,
) -> tuple[torch.nn.Module, list[float]]:
    """Trains one U-Net on {uid: (images uint8 [N, S, S, 3], mask uint8 [N, S, S], slice spacing mm)}; returns
    it and its losses.

    Every rank starts from the same weights (``start``, a state dict, or drawn with ``seed``) and draws its
    own planes (``seed`` + rank), ``steps`` of them (default ``seg.steps``). A batch's planes are padded below
    to its longest study's rows.
    """
    seed_everything(seed)
    steps = steps or seg.steps
    model = build_segmenter(seg.encoder, seg.context)
    if start is not None:
        model.load_state_dict(start)
    # NHWC: faster on a GPU with AMP, and on a CPU (156 against 170 ms a step of 8 planes)
    model = model.to(rt.device, memory_format=torch.channels_last)
    net = distributed(model, rt)
    optimizer = torch.optim.AdamW(model.parameters(), lr=seg.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=seg.lr, total_steps=steps, pct_start=0.1)
    dtype, scaler = mixed_precision(rt.device, seg.amp)
    rng = np.random.default_rng(seed + 1000 * rt.rank)
    uids = sorted(studies)
    rows = [plane_rows(len(studies[u][0]), studies[u][2], seg.row_mm) for u in uids]  # each study's height
    losses = []
    net.train()
    for _ in progress(range(steps), desc, steps=True, leave=False, enabled=rt.is_main):
        picks = np.unique(rng.choice(len(uids), seg.batch_size), return_counts=True)
        pad_to = padded_rows(max(rows[i] for i in picks[0]))
        xs, ys = [], []
        for i, count in zip(*picks):
            images, mask, _ = studies[uids[i]]
            cols = _columns(rng, mask, int(count))
            xs.append(sagittal_planes(images, cols, seg.context, rows[i], pad_to))
            ys.append(sagittal_labels(mask, cols, rows[i], pad_to))
        x = torch.cat(xs).to(rt.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with autocast(rt.device, dtype):
            logits = net(x)
        loss = segmentation_loss(logits.float(), torch.cat(ys).to(rt.device, non_blocking=True))
        update(loss, optimizer, scaler)
        schedule.step()
        losses.append(loss.detach())  # read back once at the end: no host sync per step on a GPU
    return model.eval(), torch.stack(losses).cpu().tolist()


def slice_spacing(run: Run, uid: str) -> float:
    """A cached study's slice spacing in mm (the median step along the slice normal, from its DICOM)."""
    return float(read_meta(run.cache.root, uid)["spacing"][0])


def masked_studies(run: Run) -> list[str]:
    """The cached studies that have a segmentation, in index order."""
    uids = run.cache.read_index()["StudyInstanceUID"].unique()
    return [u for u in uids if run.cache.mask(u).is_file()]


def seg_folds(uids: list[str], seg: SegConfig) -> dict[str, int]:
    """{masked study: its segmentation fold}, at study level."""
    if len(uids) < seg.least_masks:
        raise RuntimeError(
            f"{len(uids)} studies have a segmentation: {seg.folds} folds need at least "
            f"{seg.least_masks} (the real data has 87)"
        )
    splitter = KFold(n_splits=seg.folds, shuffle=True, random_state=seg.seed)
    return {uids[i]: k for k, (_, held) in enumerate(splitter.split(uids)) for i in held}


def masked_study(run: Run, uid: str) -> tuple[np.ndarray, np.ndarray, float]:
    """A masked study as `train_segmenter` reads it: its cached images (in memory), mask and slice spacing."""
    return (
        np.asarray(load_study_images(run.cache.root, uid)),
        np.load(run.cache.mask(uid)),
        slice_spacing(run, uid),
    )


def pseudo_labels(
    run: Run, seg: SegConfig, rt: Runtime, model: torch.nn.Module, fold: int, uids: list[str]
) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """Self-training's labels of one fold: its round-1 model segments up to ``seg.pseudo_studies`` of the
    unmasked studies ``uids`` (a seeded draw); those whose vertebrae pass `check_vertebrae` and whose
    `spine_confidence` reaches ``seg.pseudo_confidence`` are returned as `train_segmenter` reads a study, the
    labels standing for a mask. Writes ``round1/pseudo<fold>.csv``: every study read, its confidence, its
    check's problems and whether it was used.

    Every rank labels them all (each draws its own planes from them), so the ranks need no exchange.
    """
    how, dtype = reading(seg), amp_dtype(rt.device, seg.amp)
    rng = np.random.default_rng(seg.seed + fold)
    chosen = [uids[i] for i in sorted(rng.permutation(len(uids))[: seg.pseudo_studies])]
    rows, kept = [], {}
    for uid in progress(chosen, f"segment fold {fold}: label", unit="study", enabled=rt.is_main):
        images, dz = np.asarray(load_study_images(run.cache.root, uid)), slice_spacing(run, uid)
        with autocast(rt.device, dtype):
            probs = plane_probabilities([model], images, dz, how, rt.device)
        labels = plane_labels(probs, dz, how)[0]
        problems = check_vertebrae(vertebra_extents(labels, seg.min_pixels)[1], dz)
        confidence = spine_confidence(probs)
        used = not problems and confidence >= seg.pseudo_confidence
        rows.append(
            {
                "StudyInstanceUID": uid,
                "confidence": round(confidence, 4),
                "used": used,
                "problems": "; ".join(problems),
            }
        )
        if used:
            kept[uid] = (images, labels, dz)
    if rt.is_main:
        write_csv(
            pd.DataFrame(rows, columns=["StudyInstanceUID", "confidence", "used", "problems"]),
            run.seg_pseudo(fold),
        )
        log.info(
            "segment fold %d: its round-1 model labelled %d unmasked studies; %d pass the check and reach "
            "confidence %.2f (%s)",
            fold,
            len(rows),
            len(kept),
            seg.pseudo_confidence,
            run.seg_pseudo(fold),
        )
    return kept


def fit_segmenter(
    run: Run,
    seg: SegConfig,
    rt: Runtime,
    fold: int,
    path: os.PathLike,
    train: dict,
    steps: int | None = None,
    start: dict | None = None,
    pseudo: Sequence[str] = (),
    labelled_by: Sequence[str] = (),
) -> torch.nn.Module:
    """Trains one fold's U-Net on ``train`` (`train_segmenter`: ``steps`` from ``start``) and saves it to
    ``path`` (rank 0), recording the masked studies it trained on and, in round 2, the unmasked ones it
    trained on through their pseudo-labels (``pseudo``) and the studies behind those (``labelled_by``)."""
    started = time.perf_counter()
    model, losses = train_segmenter(train, seg, rt, seg.seed + fold, f"segment fold {fold}", steps, start)
    if rt.is_main:
        meta = SegmenterMeta(
            reading=reading(seg),
            fold=fold,
            trained_on=sorted(set(train) - set(pseudo)),
            pseudo=sorted(pseudo),
            labelled_by=sorted(labelled_by),
            losses=losses,
        )
        save_model(model, path, meta)
        log.info(
            "segment fold %d: %d studies%s, %d steps × %d ranks in %.0f s, loss %.3f → %.3f",
            fold,
            len(train),
            f" ({len(pseudo)} of them pseudo-labelled)" if pseudo else "",
            len(losses),
            rt.world_size,
            time.perf_counter() - started,
            np.mean(losses[:20]),
            np.mean(losses[-20:]),
        )
    if rt.distributed:
        dist.barrier()
    return model


def train_seg_fold(cfg: Config, run_dir: str | os.PathLike, fold: int, rt: Runtime) -> dict:
    """Trains (or finds trained) the segmentation model of one fold, in ``seg.rounds`` rounds; returns a
    summary.

    Round 1 trains on the masked studies outside the fold. Round 2 (self-training) goes on from round 1's
    weights on those and on the unmasked studies round 1 labelled (`pseudo_labels`): the fold's masked
    studies reach it neither directly nor through a label, since its round-1 model never saw them.
    """
    run, seg = Run(run_dir), cfg.seg
    path = run.seg_model(fold)
    if path.is_file():
        return {"fold": fold, "trained": False}
    folds = seg_folds(masked_studies(run), seg)
    train = {u: masked_study(run, u) for u, k in folds.items() if k != fold}
    if seg.rounds == 1:
        fit_segmenter(run, seg, rt, fold, path, train)
        return {"fold": fold, "trained": True}
    if not run.seg_first(fold).is_file():
        fit_segmenter(run, seg, rt, fold, run.seg_first(fold), train)
    first, meta = load_segmenter(run.seg_first(fold), rt.device)
    unmasked = [u for u in run.cache.read_index()["StudyInstanceUID"].unique() if u not in folds]
    pseudo = pseudo_labels(run, seg, rt, first, fold, unmasked)
    fit_segmenter(
        run,
        seg,
        rt,
        fold,
        path,
        {**train, **pseudo},
        steps=seg.pseudo_steps or seg.steps,
        start=first.state_dict(),
        pseudo=list(pseudo),
        labelled_by=meta.trained_on,
    )
    return {"fold": fold, "trained": True}


def _check_out_of_fold(run: Run, folds: dict[str, int], metas: list[SegmenterMeta]) -> None:
    """The out-of-fold promise, from the checkpoints themselves."""
    for fold, meta in enumerate(metas):
        held = {u for u, k in folds.items() if k == fold}
        if held & set(meta.trained_on + meta.pseudo + meta.labelled_by):
            raise RuntimeError(
                f"{run.seg_model(fold)} trained on a study it would score; delete it and train again"
            )


def segment_share(
    run: Run, index: pd.DataFrame, seg: SegConfig, rt: Runtime, models: list, folds: dict[str, int]
) -> tuple[list, list, list, list]:
    """Segments this rank's share of the cached studies: per-slice tables, extents, Dice rows and each
    study's check (`check_vertebrae`)."""
    how, dtype = reading(seg), amp_dtype(rt.device, seg.amp)
    groups = list(index.groupby("StudyInstanceUID", sort=False))[rt.rank :: rt.world_size]
    rows, extents, dice, checks = [], [], [], []
    for uid, part in progress(groups, "segment studies", unit="study", enabled=rt.is_main):
        # in memory, decoded once (69 MB at 256 px × 350 slices): the planes cut across every slice, and
        # a zarr store read plane by plane decodes the whole study for each batch (16 s a batch, 0.6 s so)
        study, dz = np.asarray(load_study_images(run.cache.root, uid)), slice_spacing(run, uid)
        fold = folds.get(uid)
        with autocast(rt.device, dtype):
            probs = plane_probabilities(models if fold is None else [models[fold]], study, dz, how, rt.device)
        labels, counted = plane_labels(probs, dz, how)
        save_labels(run.seg_labels(uid), labels)
        presence, found = vertebra_extents(labels, seg.min_pixels)
        levels = slice_levels(labels, seg.min_pixels)
        part = part.sort_values("order")
        rows.append(
            pd.DataFrame(
                {
                    "StudyInstanceUID": uid,
                    "order": part["order"].to_numpy(),
                    "slice_number": part["slice_number"].to_numpy(),
                    "level": levels,
                    **{v: presence[:, i].astype(int) for i, v in enumerate(VERTEBRAE)},
                }
            )
        )
        extents += [{"StudyInstanceUID": uid, **e} for e in found]
        problems = check_vertebrae(found, dz)
        checks.append(
            {
                "StudyInstanceUID": uid,
                "counted": counted,
                "passed": not problems,
                "problems": "; ".join(problems),
            }
        )
        if fold is not None:
            dice.append(
                {
                    "StudyInstanceUID": uid,
                    "fold": fold,
                    **dice_per_vertebra(labels, np.load(run.cache.mask(uid))),
                }
            )
    return rows, extents, dice, checks


def _gather(share: tuple[list, ...], rt: Runtime) -> tuple[list, ...] | None:
    """Every rank's share, joined on rank 0 (None on the others)."""
    if not rt.distributed:
        return share
    shares = [None] * rt.world_size if rt.is_main else None
    dist.gather_object(share, shares, dst=0)
    if not rt.is_main:
        return None
    return tuple([item for part in shares for item in part[i]] for i in range(len(share)))


def segment(cfg: Config, run_dir: str | os.PathLike, rt: Runtime | None = None) -> pd.DataFrame | None:
    """The stage: trains every fold's model, then segments every cached study; returns the per-slice table
    (on rank 0; None on the other ranks under torchrun)."""
    rt = rt or init_distributed(cfg.device)
    run, seg = Run(run_dir), cfg.seg
    folds = seg_folds(masked_studies(run), seg)
    for fold in range(seg.folds):
        train_seg_fold(cfg, run, fold, rt)
    loaded = [load_segmenter(run.seg_model(k), rt.device) for k in range(seg.folds)]
    _check_out_of_fold(run, folds, [meta for _, meta in loaded])
    index = run.cache.read_index()
    joined = _gather(segment_share(run, index, seg, rt, [m for m, _ in loaded], folds), rt)
    if joined is None:
        return None
    rows, extents, dice, checks = joined
    order = {u: i for i, u in enumerate(index["StudyInstanceUID"].unique())}
    checks = pd.DataFrame(sorted(checks, key=lambda c: order[c["StudyInstanceUID"]]))
    write_csv(checks, run.seg_file("checks.csv"))
    failed = checks[~checks["passed"]]
    if len(failed):
        log.warning(
            "segment: the vertebrae of %d of %d studies fail their check (%s); no slice of theirs is labelled "
            "from its vertebrae (%s)",
            len(failed),
            len(checks),
            "; ".join(f"{u}: {p}" for u, p in zip(failed["StudyInstanceUID"][:3], failed["problems"][:3])),
            run.seg_file("checks.csv"),
        )
    table = pd.concat(sorted(rows, key=lambda r: order[r["StudyInstanceUID"].iat[0]]), ignore_index=True)
    extents.sort(key=lambda e: order[e["StudyInstanceUID"]])  # stable: C1..C7 within a study
    dice.sort(key=lambda d: order[d["StudyInstanceUID"]])
    write_csv(
        pd.DataFrame(extents, columns=["StudyInstanceUID", "vertebra", "z0", "z1", "y0", "y1", "x0", "x1"]),
        run.seg_file("extents.csv"),
    )
    write_csv(pd.DataFrame(dice), run.seg_file("dice.csv"))
    write_csv(table, run.seg_file("vertebrae.csv"))  # written last: the stage is done when it exists
    mean = pd.DataFrame(dice)[list(VERTEBRAE)].mean()
    log.info(
        "segment: %d studies; out-of-fold Dice on %d masked studies: %s (mean %.3f)",
        table["StudyInstanceUID"].nunique(),
        len(dice),
        ", ".join(f"{v} {d:.2f}" for v, d in mean.items()),
        mean.mean(),
    )
    return table


def is_segmented(cfg: Config, run_dir: str | os.PathLike) -> bool:
    """Whether every fold model, the per-slice table and the studies' checks exist."""
    run = Run(run_dir)
    return (
        run.seg_file("vertebrae.csv").is_file()
        and run.seg_file("checks.csv").is_file()
        and all(run.seg_model(k).is_file() for k in range(cfg.seg.folds))
        and run.seg_labels_dir.is_dir()
    )
