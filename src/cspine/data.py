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

from cspine import VERTEBRAE
from cspine.config import SliceConfig
from cspine.prepare import UNKNOWN, load_study_images

# Channel statistics for uint8 window images scaled to [0, 1]; a fixed, documented normalisation keeps
# cached features comparable across runs (ImageNet's would matter only with ImageNet weights).
MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)
OPEN_STUDIES = 64  # memory-mapped studies a dataset keeps open at once
TARGET_COLUMNS = ["label", *[f"{v}_fracture" for v in VERTEBRAE], *[f"{v}_present" for v in VERTEBRAE]]


def build_transforms(cfg: SliceConfig, train: bool, size: int, seed: int | None = None) -> A.Compose:
    """The paper's augmentation (horizontal flip, ±10° rotation) for training; more with ``extra_aug``.

    Args:
        cfg: flip probability, rotation range and the extra switch.
        train: False gives only resizing and normalisation.
        size: output side (``cfg.input_size`` or the cache's size).
        seed: the pipeline's own RNG seed (reseeded per worker and epoch by the loader).
    """
    ops: list = []
    if train:
        if cfg.hflip > 0:
            ops.append(A.HorizontalFlip(p=cfg.hflip))
        if cfg.rotate > 0:
            ops.append(A.Rotate(limit=(-cfg.rotate, cfg.rotate), border_mode=cv2.BORDER_CONSTANT, fill=0, p=1.0))
        if cfg.extra_aug:
            ops += [
                A.Affine(scale=(0.9, 1.1), translate_percent=(-0.05, 0.05), border_mode=cv2.BORDER_CONSTANT,
                         fill=0, p=0.5),
                A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.1, p=0.5),
                A.GaussNoise(std_range=(0.01, 0.03), p=0.3),
            ]
    ops += [A.Resize(size, size, interpolation=cv2.INTER_LINEAR), A.Normalize(mean=MEAN, std=STD)]
    return A.Compose(ops, strict=True, seed=seed)


class SliceDataset(Dataset):
    """One item per index row: (image float [3, H, W], targets float [15], known float [15]).

    Targets follow `SLICE_OUTPUTS`; ``known`` is 0 where the data cannot give a label (no boxes or no mask
    for that study), so the loss skips it.
    """

    def __init__(self, cache_dir: str | Path, index: pd.DataFrame, transform: A.Compose):
        self.cache_dir = Path(cache_dir)
        self.uids = index["StudyInstanceUID"].to_numpy()
        self.orders = index["order"].to_numpy()
        self.targets = index[TARGET_COLUMNS].to_numpy(dtype=np.float32)
        self.transform = transform
        self._studies: OrderedDict[str, np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return len(self.uids)

    def image(self, i: int) -> np.ndarray:
        """uint8 [H, W, 3] of item i, as cached."""
        uid = self.uids[i]
        if uid in self._studies:
            self._studies.move_to_end(uid)
        else:
            # each memory map holds a file descriptor: keep a bounded few open (the real data has ~2,000 studies)
            if len(self._studies) >= OPEN_STUDIES:
                self._studies.popitem(last=False)
            self._studies[uid] = load_study_images(self.cache_dir, uid)
        return np.asarray(self._studies[uid][self.orders[i]])

    def __getitem__(self, i: int):
        image = self.transform(image=self.image(i))["image"]
        target = self.targets[i]
        known = (target != UNKNOWN).astype(np.float32)
        return (torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
                torch.from_numpy(np.where(known > 0, target, 0).astype(np.float32)), torch.from_numpy(known))


def seed_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: a distinct augmentation stream per worker (and per epoch).

    albumentations 2.0.8 copies one RNG state into every worker, so without this all workers repeat the
    same flips and rotations. torch gives each worker its own initial seed; the pipeline takes it.
    """
    info = torch.utils.data.get_worker_info()
    seed = int(torch.initial_seed() % 2**32)
    np.random.seed(seed)
    info.dataset.transform.set_random_seed(seed)


class BalancedDistributedSampler(DistributedSampler):
    """A DistributedSampler that can also draw positives and negatives equally, per epoch and seed.

    With ``labels`` given, each epoch draws ``num_samples_total`` indices (default: each positive once, on
    average) with replacement, ``positive_fraction`` of them from positive items and the rest from negative ones. Without labels but with
    ``num_samples_total``, it draws that many items uniformly. Otherwise it is DistributedSampler's shuffled
    pass. Every rank takes its own interleaved share, and ``set_epoch`` changes the draw.
    """

    def __init__(self, dataset: Dataset, labels: np.ndarray | None = None, num_samples_total: int | None = None,
                 num_replicas: int = 1, rank: int = 0, seed: int = 0, positive_fraction: float = 0.5):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.labels = None if labels is None else np.asarray(labels)
        self.positive_fraction = positive_fraction
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
            n_pos = int(round(self.total_size * self.positive_fraction))
            picks = np.concatenate([rng.choice(pos if len(pos) else neg, n_pos),
                                    rng.choice(neg if len(neg) else pos, self.total_size - n_pos)])
            rng.shuffle(picks)
        return iter(picks[self.rank:self.total_size:self.num_replicas].tolist())
