"""How the models read a study: normalisation, neighbouring slices as channels, and the BLSTM's input.

Training (`cspine.data`, `cspine.train_seq`), extraction and inference (`cspine.extract`, `cspine.predict`)
all build their inputs with these functions, so a model never meets an input made another way. Nothing here
trains, and nothing here needs a training-only package.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from cspine import VERTEBRAE

# One mean and std for every channel (each window, each neighbouring slice) of uint8 images scaled to
# [0, 1], for networks trained from scratch: a fixed, documented normalisation keeps cached features
# comparable across runs. A CNN normalises its own input (`cspine.models.InputNorm`): with these, or with
# the mean and std its pretrained weights expect.
MEAN = 0.5
STD = 0.25
PROB_CLIP = 1e-4  # slice probabilities are stored as float16; log-odds are clipped to about ±9.2

# What a slice CNN answers for each slice, in column order: whether the slice shows a fracture, whether it
# shows a fracture of each vertebra, and whether it shows each vertebra. Every reader of the CNN's outputs
# ([N, 15] arrays) finds its column with `FRACTURE`, `fractured` and `present`.
SLICE_OUTPUTS = ("fracture", *[f"{v}_fracture" for v in VERTEBRAE], *[f"{v}_present" for v in VERTEBRAE])
FRACTURE = 0


def fractured(k: int) -> int:
    """The column of "vertebra k (0 = C1) fractured on this slice" in `SLICE_OUTPUTS`."""
    return 1 + k


def present(k: int) -> int:
    """The column of "vertebra k (0 = C1) shown on this slice" in `SLICE_OUTPUTS`."""
    return 1 + len(VERTEBRAE) + k


# inputs made of the CNN's outputs: how many of them (SLICE_OUTPUTS order)
CNN_OUTPUTS = {
    "probs": len(SLICE_OUTPUTS),
    "fracture": 1,
}


@dataclass(frozen=True)
class SliceReading:
    """How a slice CNN reads a study, as it trained; kept in its checkpoint, read by `predict`.

    ``size``, ``crop`` and ``margin`` are the cache's preprocessing (`cspine.preprocess`: side in px, the Otsu
    crop's kind and its margin); ``input_size`` is the side the CNN reads; ``context`` its neighbouring
    slices on each side (`slice_stack`).
    """

    size: int
    crop: str
    margin: float
    input_size: int
    context: int


def logit(p) -> np.ndarray:
    """float64 log-odds of probabilities clipped to [PROB_CLIP, 1 − PROB_CLIP] (about ±9.2)."""
    q = np.clip(np.asarray(p, dtype=np.float64), PROB_CLIP, 1 - PROB_CLIP)
    return np.log(q / (1 - q))


def noisy_or(p: np.ndarray) -> np.ndarray:
    """[..., 7] vertebra probabilities → [...]: the probability that at least one is fractured, 1 − Π(1 − p_k)."""
    return 1 - np.prod(1 - np.asarray(p, dtype=np.float64), axis=-1)


def vertebra_slices(extents: dict[str, tuple[int, int]] | None, vertebra: str, n: int, margin: int) -> slice:
    """The slices read as ``vertebra``'s, of a study of ``n``: its segmented extent {vertebra: (first, last)},
    ``margin`` slices wider on each side; the whole study where the segmentation did not find it (or none
    exists)."""
    z0, z1 = (extents or {}).get(vertebra, (0, n - 1))
    return slice(max(0, z0 - margin), min(n - 1, z1 + margin) + 1)


def slice_stack(study: np.ndarray, orders: np.ndarray, context: int = 0) -> np.ndarray:
    """uint8 [B, H, W, 3·(2·context + 1)]: slices ``orders`` of a study with their neighbours as channels.

    A fracture is a line through the bone in three dimensions, while a joint space or a foramen looks like a
    gap on one slice too; the slices above and below tell them apart (the "2.5D" input of many RSNA 2022
    solutions). Channels run head to feet, three windows per slice, so the middle three are the slice
    itself; neighbours beyond the study's ends repeat its first or last slice. ``context=0`` is the paper's
    single slice.

    Args:
        study: uint8 [N, H, W, 3], a study's cached slices, head to feet.
        orders: int [B], the slices wanted.
        context: neighbours on each side.
    """
    orders = np.asarray(orders, dtype=int)
    if not context:
        return np.asarray(study[orders])
    window = np.clip(orders[:, None] + np.arange(-context, context + 1)[None], 0, len(study) - 1)
    stacked = np.asarray(study[window.ravel()])  # [B·(2c+1), H, W, 3]
    b, k = window.shape
    h, w, c = stacked.shape[1:]
    stacked = stacked.reshape(b, k, h, w, c).transpose(0, 2, 3, 1, 4)  # [B, H, W, slice, window]
    return np.ascontiguousarray(stacked.reshape(b, h, w, k * c))


def to_tensor(images: np.ndarray, size: int, device: torch.device, channels_last: bool) -> torch.Tensor:
    """uint8 [B, H, W, C] → float [B, C, size, size] in [0, 1] on the device (resized if needed); the CNN
    normalises it as its weights expect (`cspine.models.InputNorm`).

    C is 3, or 3·(2·context + 1) for a `slice_stack`.
    """
    x = torch.from_numpy(np.require(images, requirements=["C", "W"])).to(device, non_blocking=True)
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    if x.shape[-1] != size:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def bin_slices(x: np.ndarray, bins: int) -> np.ndarray:
    """[N, D] → [bins, D]: the maximum over each of ``bins`` equal runs of slices (0 leaves x as it is).

    Studies differ several-fold in length, and a BLSTM tells C1 from C7 by how far into the sequence
    it is. Pooled to a fixed number of runs, every study puts C1 near the start and C7 near the end on the
    same scale, in training and at inference alike; the maximum keeps a fracture seen on a single slice.
    Shorter studies are stretched (slices repeated).
    """
    if not bins:
        return x
    pooled = F.adaptive_max_pool1d(torch.from_numpy(np.ascontiguousarray(x.T, dtype=np.float32))[None], bins)
    return pooled[0].T.contiguous().numpy()


def study_input(features: np.ndarray | None, probs: np.ndarray, mode: str, bins: int = 0) -> np.ndarray:
    """The BLSTM's input for a study: CNN features, or CNN outputs as log-odds, pooled to ``bins`` runs.

    ``mode``: "features" (the paper), "probs" (all 15 slice outputs) or "fracture" (the slice-fracture
    output alone). Log-odds, not probabilities: the evidence sits in the tail (0.9 against 0.999), which
    standardising raw probabilities squeezes into a sliver. Training and `predict` both build their input
    here, so the two never differ.
    """
    if mode == "features":
        x = np.asarray(features, dtype=np.float32)
    elif mode in CNN_OUTPUTS:
        x = logit(probs[:, : CNN_OUTPUTS[mode]]).astype(np.float32)
    else:
        raise ValueError(f"seq.input must be 'features', 'probs' or 'fracture', not {mode!r}")
    return bin_slices(x, bins)


# per run of slices: fracture, k-fracture, k-presence log-odds; one-hot of k
VERTEBRA_FEATURES = 3 + len(VERTEBRAE)


def vertebra_inputs(
    probs: np.ndarray, extents: dict[str, tuple[int, int]], margin: int, bins: int
) -> np.ndarray:
    """float32 [7, bins, VERTEBRA_FEATURES]: each vertebra's slices, as the vertebra track reads them.

    Args:
        probs: the CNN's outputs [N, 15] on a study's slices (`SLICE_OUTPUTS` order), head to feet.
        extents: {vertebra: (first, last slice)}; a vertebra the segmentation did not find reads the
            whole study.
        margin: slices added on each side of an extent.
        bins: runs each vertebra's slices are max-pooled into (`cspine.inputs.bin_slices`).
    """
    logits = logit(probs).astype(np.float32)
    out = np.zeros((len(VERTEBRAE), bins, VERTEBRA_FEATURES), np.float32)
    for i, name in enumerate(VERTEBRAE):
        rows = logits[vertebra_slices(extents, name, len(probs), margin)]
        out[i, :, :3] = bin_slices(rows[:, [FRACTURE, fractured(i), present(i)]], bins)
        out[i, :, 3 + i] = 1.0
    return out


def combine(p: np.ndarray) -> np.ndarray:
    """[S, 7] vertebra probabilities → [S, 8] in TARGETS order, patient_overall = 1 − Π(1 − p_k)."""
    return np.concatenate([noisy_or(p)[:, None], p], axis=1)
