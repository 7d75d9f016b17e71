"""Level 2: what the blend reads of a study, and how a saved blend answers. Inference imports this module.

The `blend` stage fits, per target, a regularised logistic regression over the outputs of every model a
run has (`study_inputs`); `predict` computes the same inputs on a test study from each fold's models and
applies that fold's blend (`apply_blend`). Everything is log-odds: the evidence sits in the tails, which
probabilities squeeze together, and a logistic regression on log-odds can only rescale and shift them.

Inputs, by name (``H`` a BLSTM size, ``Ck`` a vertebra):

- ``blstm{H}:{target}``: the study BLSTM's output for the target;
- ``cnn:max``, ``cnn:top``, ``cnn:mean``: the slice CNN's slice-fracture output over the whole study,
  pooled by the maximum, the mean of the ``top_k`` highest slices, and the mean;
- ``cnn:{Ck}`` and ``cnn:frac@{Ck}``: the CNN's Ck head and its slice-fracture output, each max-pooled over
  the slices Ck spans (its segmented extent, ``margin`` slices wider; the whole study where no
  segmentation found it, or none exists);
- ``vert:{Ck}``: the vertebra track; ``vert:max`` and ``vert:noisy_or`` (1 − Π(1 − p_k)) aggregate it for
  patient_overall;
- ``crop:{Ck}``, ``crop:max``, ``crop:noisy_or``: the crop track, likewise.

Each fold's models put their outputs on scales of their own (two CNNs trained on different studies are not
equally confident), so with ``per_fold`` every input is first standardised within its fold: the mean and
spread of fold k's models' outputs over fold k's own held-out studies (no labels), the same numbers
`predict` applies to a test study read through fold k's models (`fold_standards`, `standardise`).

This module needs no scikit-learn: a saved blend is plain numbers (`cspine.checkpoints`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from cspine import TARGETS, VERTEBRAE
from cspine.inputs import FRACTURE, fractured, logit, noisy_or, vertebra_slices

__all__ = ["Blend", "TargetModel", "logit"]

OVERALL = TARGETS[0]
TRACKS = ("vert", "crop")  # the tracks' inputs' prefixes: the vertebra track's and the crop track's


def blstm_input(hidden: int, target: str) -> str:
    """The name of the input "the BLSTM of size ``hidden``'s output for ``target``"."""
    return f"blstm{hidden}:{target}"


@dataclass(frozen=True)
class TargetModel:
    """One target's logistic regression: ``sigmoid(coef · (x − mean) / scale + intercept)`` over its
    ``inputs`` (names, as `study_inputs` gives them)."""

    inputs: list[str]
    mean: list[float]
    scale: list[float]
    coef: list[float]
    intercept: float


@dataclass(frozen=True)
class Blend:
    """A fitted level-2 blend and everything `predict` needs to read a study as it was fitted: kept in
    ``blend/*.pt`` (`cspine.checkpoints.save_blend`).

    What it reads of a study, through one fold's models (`study_inputs`): the BLSTMs of ``sizes``, the CNN's
    outputs over each vertebra's slices (``extents``: the segmentation's; else the whole study) ``margin``
    slices wider and its ``top_k`` highest slices, the vertebra track (``vertebra``) and the crop track
    (``crop``). ``standards``: each fold's input standardisation (`fold_standards`), or None. ``folds``:
    the folds whose models it reads; ``models``: what `blend.models` named; ``through``: the digests of
    every checkpoint it was fitted through; ``trained_on``: the studies it was fitted on.
    """

    targets: dict[str, TargetModel]
    floor: bool
    standards: dict | None
    top_k: int
    margin: int
    sizes: list[int]
    extents: bool
    vertebra: bool
    crop: bool
    folds: list[int]
    models: list[str]
    through: dict[str, str]
    trained_on: list[str]

    def answer(self, inputs: pd.DataFrame) -> np.ndarray:
        """float [S, 8] in TARGETS order for studies' inputs (`apply_blend`)."""
        return apply_blend(self.targets, inputs, self.floor, self.standards)

    @property
    def segmented(self) -> bool:
        """Whether it reads the segmentation (each vertebra's slices, or a track that needs it)."""
        return self.extents or self.vertebra or self.crop


def extents_by_study(extents: pd.DataFrame) -> dict[str, dict[str, tuple[int, int]]]:
    """{study: {vertebra: (z0, z1)}} from the `segment` stage's extents table."""
    out: dict[str, dict[str, tuple[int, int]]] = {}
    for row in extents.itertuples(index=False):
        out.setdefault(row.StudyInstanceUID, {})[row.vertebra] = (int(row.z0), int(row.z1))
    return out


def study_inputs(
    probs: np.ndarray,
    extents: dict[str, tuple[int, int]] | None,
    blstm: dict[int, np.ndarray],
    vert: np.ndarray | None,
    top_k: int,
    margin: int,
    crop: np.ndarray | None = None,
) -> dict[str, float]:
    """Every level-2 input of one study, as read through one fold's models.

    Args:
        probs: float [N, 15], the slice CNN's outputs on the study (`SLICE_OUTPUTS` order), head to feet.
        extents: {vertebra: (first, last slice)} from the segmentation, or None without one.
        blstm: {size: float [8]} the study BLSTMs' probabilities in TARGETS order.
        vert: float [7], the vertebra track's C1..C7 probabilities, or None without the track.
        top_k: slices averaged for ``cnn:top``.
        margin: slices added on each side of a vertebra's extent.
        crop: float [7], the crop track's C1..C7 probabilities, or None without the track.
    """
    z = logit(probs)
    fracture = z[:, FRACTURE]
    n = len(z)
    top = np.sort(fracture)[::-1][: max(1, min(top_k, n))]
    out = {"cnn:max": float(fracture.max()), "cnn:top": float(top.mean()), "cnn:mean": float(fracture.mean())}
    for i, name in enumerate(VERTEBRAE):
        rows = vertebra_slices(extents, name, n, margin)
        out[f"cnn:{name}"] = float(z[rows, fractured(i)].max())
        out[f"cnn:frac@{name}"] = float(fracture[rows].max())
    for hidden, p in blstm.items():
        out.update({blstm_input(hidden, t): float(v) for t, v in zip(TARGETS, logit(p))})
    for track, p in zip(TRACKS, (vert, crop)):
        if p is not None:
            out.update({f"{track}:{v}": float(x) for v, x in zip(VERTEBRAE, logit(p))})
            out[f"{track}:max"] = float(logit(np.max(p)))
            out[f"{track}:noisy_or"] = float(logit(noisy_or(p)))
    return out


def target_inputs(target: str, available: list[str]) -> list[str]:
    """The inputs the blend of ``target`` reads, of those ``available`` (a run without a track lacks its).

    patient_overall reads every study-level view: the BLSTMs' patient_overall, the three poolings of the
    slice-fracture output and the two tracks' two aggregates. Vertebra Ck reads what speaks of Ck: the
    BLSTMs' Ck, the CNN's Ck head and slice-fracture output on Ck's slices, and each track's Ck.
    """
    if target == OVERALL:
        wanted = ["cnn:max", "cnn:top", "cnn:mean", "vert:max", "vert:noisy_or", "crop:max", "crop:noisy_or"]
    else:
        wanted = [f"cnn:{target}", f"cnn:frac@{target}", f"vert:{target}", f"crop:{target}"]
    blstms = sorted(name for name in available if name.startswith("blstm") and name.endswith(f":{target}"))
    return blstms + [name for name in wanted if name in available]


def fold_standards(inputs: pd.DataFrame) -> dict[str, dict[str, dict[str, float]]]:
    """{fold: {"mean": {input: m}, "scale": {input: s}}}: each input's mean and spread over each fold's rows
    (`fold_inputs` rows: StudyInstanceUID, fold, inputs); a constant input keeps scale 1."""
    names = [c for c in inputs.columns if c not in ("StudyInstanceUID", "fold")]
    out = {}
    for fold, rows in inputs.groupby("fold"):
        values = rows[names].to_numpy(np.float64)
        scale = values.std(axis=0)
        scale[scale < 1e-6] = 1.0
        out[str(int(fold))] = {
            "mean": dict(zip(names, values.mean(axis=0).tolist())),
            "scale": dict(zip(names, scale.tolist())),
        }
    return out


def standardise(inputs: pd.DataFrame, standards: dict) -> pd.DataFrame:
    """``inputs`` with every input the standards know standardised by its row's fold's `fold_standards`
    (other columns, such as an input the blend was fitted without, pass unchanged).

    Raises:
        KeyError: a row's fold that the standards do not know, or an input they know missing from ``inputs``.
    """
    out = inputs.copy()
    for fold, rows in inputs.groupby("fold"):
        known = standards[str(int(fold))]
        names = list(known["mean"])
        mean, scale = np.array(list(known["mean"].values())), np.array([known["scale"][n] for n in names])
        out.loc[rows.index, names] = (rows[names].to_numpy(np.float64) - mean) / scale
    return out


def apply_blend(
    targets: dict[str, TargetModel], inputs: pd.DataFrame, floor: bool = False, standards: dict | None = None
) -> np.ndarray:
    """float [S, 8] in TARGETS order: the targets' models' probabilities for studies' inputs (one row each,
    with the fold whose models read it, when ``standards`` standardise per fold).

    Each target's model is ``sigmoid(coef · (x − mean) / scale + intercept)`` on its own inputs (after
    `standardise` with ``standards``); with ``floor``, patient_overall is raised to the largest vertebra
    probability (a study with a broken vertebra is a broken study).

    Raises:
        KeyError: an input a model needs is missing from ``inputs``.
    """
    if standards:
        inputs = standardise(inputs, standards)
    out = np.zeros((len(inputs), len(TARGETS)))
    for i, target in enumerate(TARGETS):
        model = targets[target]
        x = inputs[model.inputs].to_numpy(np.float64) if model.inputs else np.zeros((len(inputs), 0))
        z = ((x - np.asarray(model.mean)) / np.asarray(model.scale)) @ np.asarray(
            model.coef
        ) + model.intercept
        out[:, i] = 1 / (1 + np.exp(-z))
    if floor:
        out[:, 0] = np.maximum(out[:, 0], out[:, 1:].max(axis=1))
    return out
