"""Slices from the `prepare` cache as tensors: transforms, the dataset, worker seeding, sampling."""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, DistributedSampler

from cspine.cache import load_study_images, read_meta
from cspine.config import SliceConfig
from cspine.inputs import FRACTURE, SLICE_OUTPUTS, slice_stack
from cspine.labels import UNKNOWN

OPEN_STUDIES = 64  # memory-mapped studies a dataset keeps open at once
# the slice index's columns of each of the CNN's outputs: the slice's own label, then the per-vertebra ones
TARGET_COLUMNS = ["label", *SLICE_OUTPUTS[1:]]


def build_transforms(cfg: SliceConfig, train: bool, size: int, seed: int | None = None) -> A.Compose:
    """The paper's augmentation (horizontal flip, ±10° rotation) for training; more with ``extra_aug``.

    Args:
        cfg: flip probability, rotation range and the extra switch.
        train: False gives only resizing and scaling to [0, 1].
        size: output side (``cfg.input_size`` or the cache's size).
        seed: the pipeline's own RNG seed (reseeded per worker and epoch by the loader).
    """
    ops: list = []
    if train:
        if cfg.hflip > 0:
            ops.append(A.HorizontalFlip(p=cfg.hflip))
        if cfg.rotate > 0:
            ops.append(
                A.Rotate(limit=(-cfg.rotate, cfg.rotate), border_mode=cv2.BORDER_CONSTANT, fill=0, p=1.0)
            )
        if cfg.extra_aug:
            ops += [
                A.Affine(
                    scale=(0.9, 1.1),
                    translate_percent=(-0.05, 0.05),
                    border_mode=cv2.BORDER_CONSTANT,
                    fill=0,
                    p=0.5,
                ),
                A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.1, p=0.5),
                A.GaussNoise(std_range=(0.01, 0.03), p=0.3),
            ]
    # to [0, 1] only: the CNN normalises its input as its weights expect (`cspine.models.InputNorm`)
    ops += [A.Resize(size, size, interpolation=cv2.INTER_LINEAR), A.ToFloat(max_value=255.0)]
    return A.Compose(ops, strict=True, seed=seed)


class SliceDataset(Dataset):
    """One item per index row: (image float [C, H, W], targets float [15], known float [15]).

    C is 3 (the slice's three windows), or 3·(2·context + 1) with ``context`` neighbours each side
    (`slice_stack`).

    Targets follow `SLICE_OUTPUTS`; ``known`` is 0 where the data cannot give a label (no boxes or no mask
    for that study), so the loss skips it. With ``with_boxes``, a fourth item is the slice's box map float
    [H, W]: 1 inside its fracture boxes, 0 elsewhere, moved by the same flips and rotations as the image; all
    −1 where the slice's label is unknown (a fractured study without boxes), which the loss skips.
    """

    def __init__(
        self,
        cache_dir: str | Path,
        index: pd.DataFrame,
        transform: A.Compose,
        with_boxes: bool = False,
        context: int = 0,
    ):
        self.cache_dir = Path(cache_dir)
        self.context = context
        self.uids = index["StudyInstanceUID"].to_numpy()
        self.orders = index["order"].to_numpy()
        self.targets = index[TARGET_COLUMNS].to_numpy(dtype=np.float32)
        self.transform = transform
        self.boxes = study_boxes(self.cache_dir, pd.unique(self.uids)) if with_boxes else None
        self._studies: OrderedDict[str, np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return len(self.uids)

    def image(self, i: int) -> np.ndarray:
        """uint8 [H, W, C] of item i: the cached slice, with its neighbours when ``context`` > 0."""
        uid = self.uids[i]
        if uid in self._studies:
            self._studies.move_to_end(uid)
        else:
            # each memory map holds a file descriptor: keep a bounded few open (the real data has ~2,000 studies)
            if len(self._studies) >= OPEN_STUDIES:
                self._studies.popitem(last=False)
            self._studies[uid] = load_study_images(self.cache_dir, uid)
        return slice_stack(self._studies[uid], self.orders[i : i + 1], self.context)[0]

    def box_mask(self, i: int, shape: tuple[int, int]) -> np.ndarray | None:
        """uint8 [H, W] of item i's boxes in the cached image (None: unknown)."""
        if self.targets[i, FRACTURE] == UNKNOWN:
            return None
        mask = np.zeros(shape, np.uint8)
        for x0, y0, x1, y1 in self.boxes[self.uids[i]].get(int(self.orders[i]), ()):
            mask[max(int(y0), 0) : int(np.ceil(y1)), max(int(x0), 0) : int(np.ceil(x1))] = 1
        return mask

    def __getitem__(self, i: int):
        image = self.image(i)
        target = self.targets[i]
        known = (target != UNKNOWN).astype(np.float32)
        mask = self.box_mask(i, image.shape[:2]) if self.boxes is not None else None
        out = self.transform(image=image, mask=mask) if mask is not None else self.transform(image=image)
        item = (
            torch.from_numpy(np.ascontiguousarray(out["image"].transpose(2, 0, 1))),
            torch.from_numpy(np.where(known > 0, target, 0).astype(np.float32)),
            torch.from_numpy(known),
        )
        if self.boxes is None:
            return item
        side = out["image"].shape[:2]
        boxes = out["mask"].astype(np.float32) if mask is not None else np.full(side, -1.0, np.float32)
        return (*item, torch.from_numpy(np.ascontiguousarray(boxes)))


def study_boxes(cache_dir: Path, uids) -> dict[str, dict[int, list]]:
    """{study: {slice order: [(x0, y0, x1, y1), ...]}} from the cache (slices without boxes absent)."""
    out = {}
    for uid in uids:
        slices: dict[int, list] = {}
        for order, *box in read_meta(cache_dir, uid)["boxes"]:
            slices.setdefault(int(order), []).append(box)
        out[uid] = slices
    return out


def seed_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: a distinct augmentation stream per worker (and per epoch).

    albumentations 2.0.8 copies one RNG state into every worker, so without this all workers repeat the
    same flips and rotations. torch gives each worker its own initial seed; the pipeline takes it.
    """
    info = torch.utils.data.get_worker_info()
    seed = int(torch.initial_seed() % 2**32)
    np.random.seed(seed)
    info.dataset.transform.set_random_seed(seed)


def height_matched_weights(index: pd.DataFrame, bins: int = 20) -> np.ndarray:
    """Sampling weights that give negative slices the positives' distribution of height in the study.

    Fractures cluster at some levels (C2, C6–C7), so a slice's height in the series predicts its label; a
    CNN fed uniform negatives learns "looks like C2" before it learns what a fracture looks like, and then
    flags C2 in every healthy neck. Negatives drawn at the heights where positives lie remove that shortcut.
    Height is the slice's rank over the study's slice count (head to feet), in ``bins`` bins.

    Returns:
        float [len(index)]: per negative slice, the positives' share of its bin over the negatives' share
        (0 in bins without positives); positives get 0. Normalised to mean 1 over negatives; all negatives
        weigh 1 when there are no positives.
    """
    counts = index.groupby("StudyInstanceUID")["order"].transform("count").to_numpy()
    height = np.minimum((index["order"].to_numpy() / np.maximum(counts, 1) * bins).astype(int), bins - 1)
    positive = index["label"].to_numpy() == 1
    pos_hist = np.bincount(height[positive], minlength=bins).astype(float)
    neg_hist = np.bincount(height[~positive], minlength=bins).astype(float)
    if pos_hist.sum() == 0 or neg_hist.sum() == 0:
        return np.where(positive, 0.0, 1.0)
    ratio = (pos_hist / pos_hist.sum()) / np.maximum(neg_hist / neg_hist.sum(), 1e-12)
    weights = np.where(positive, 0.0, ratio[height])
    return weights / weights[~positive].mean()


class BalancedDistributedSampler(DistributedSampler):
    """A DistributedSampler that can also draw positives and negatives equally, per epoch and seed.

    With ``labels`` given, each epoch draws ``num_samples_total`` indices (default: each positive once, on
    average) with replacement, ``positive_fraction`` of them from positive items and the rest from negative
    ones; ``negative_weights`` (e.g. `height_matched_weights`) then skew ``matched_fraction`` of the
    negatives towards chosen items, the rest staying uniform. Without labels but with ``num_samples_total``,
    it draws that many items uniformly. Otherwise it is DistributedSampler's shuffled pass. Every rank takes
    its own interleaved share, and ``set_epoch`` changes the draw.
    """

    def __init__(
        self,
        dataset: Dataset,
        labels: np.ndarray | None = None,
        num_samples_total: int | None = None,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        positive_fraction: float = 0.5,
        negative_weights: np.ndarray | None = None,
        matched_fraction: float = 0.0,
    ):
        super().__init__(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False
        )
        self.labels = None if labels is None else np.asarray(labels)
        self.positive_fraction = positive_fraction
        self.negative_weights = (
            None if negative_weights is None else np.asarray(negative_weights, dtype=float)
        )
        self.matched_fraction = matched_fraction if self.negative_weights is not None else 0.0
        self.drawn = self.labels is not None or bool(num_samples_total)
        if self.drawn:
            total = num_samples_total or int(max(int((self.labels == 1).sum()), 1) / positive_fraction)
            self.num_samples = math.ceil(total / num_replicas)
            self.total_size = self.num_samples * num_replicas

    def __iter__(self):
        if not self.drawn:
            return super().__iter__()
        rng = np.random.default_rng([self.seed, self.epoch])
        n = len(self.dataset)
        if self.labels is None:
            picks = rng.choice(n, self.total_size, replace=self.total_size > n)
        else:
            pos, neg = np.flatnonzero(self.labels == 1), np.flatnonzero(self.labels != 1)
            n_pos = round(self.total_size * self.positive_fraction)
            n_neg = self.total_size - n_pos
            n_matched = round(n_neg * self.matched_fraction) if len(neg) else 0
            if n_matched:
                w = self.negative_weights[neg]
                n_matched = n_matched if w.sum() > 0 else 0
            picks = [
                rng.choice(pos if len(pos) else neg, n_pos),
                rng.choice(neg if len(neg) else pos, n_neg - n_matched),
            ]
            if n_matched:
                picks.append(rng.choice(neg, n_matched, p=w / w.sum()))
            picks = np.concatenate(picks)
            rng.shuffle(picks)
        return iter(picks[self.rank : self.total_size : self.num_replicas].tolist())
