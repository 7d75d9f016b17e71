"""Stage `evaluate`: the paper's cross-validated tables and the competition score, from out-of-fold predictions.

    python -m cspine evaluate --config demo

Writes ``<run>/report/``: ``report.md`` (Table 2: image level; Table 3: BLSTM-96/128/256 with max and mean
pooling of slice probabilities beside them, balanced and imbalanced; competition scores in both
normalisations; per-vertebra AUCs), the tables as CSV, ``roc.png`` and ``calibration.png``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from sklearn.calibration import calibration_curve
from sklearn.metrics import roc_auc_score, roc_curve

from cspine import TARGETS, VERTEBRAE, ensemble
from cspine.cache import read_meta
from cspine.checkpoints import load_blend
from cspine.competition import THORACIC, TRUTH_DIR, read_truth_labels
from cspine.config import Config, save_config
from cspine.features import load_features, oof_sources
from cspine.inputs import FRACTURE, SLICE_OUTPUTS, fractured
from cspine.labels import UNKNOWN
from cspine.metrics import (
    bootstrap_auc,
    cv_table,
    loss_by_target,
    oof_table,
    p_columns,
    paper_reports,
    read_oof,
    target_log_loss,
    weighted_log_loss,
    write_table,
)
from cspine.preprocess import labels_in_cache_frame
from cspine.runs import Run, read_json, save_figure, write_csv, write_text
from cspine.segmenter import dice_per_vertebra, load_labels
from cspine.stacking import TargetModel
from cspine.submission import prior_from_train

log = logging.getLogger(__name__)


def oof_slice_probs(run_dir: str | os.PathLike) -> dict[str, tuple[int, np.ndarray]]:
    """{study: (fold, slice probabilities [N, 15])}, each from the CNN that never trained on the study."""
    return {uid: (fold, load_features(run_dir, fold, uid)[1]) for uid, fold in oof_sources(run_dir).items()}


def pooled_predictions(
    slice_probs: dict[str, tuple[int, np.ndarray]], uids: list[str], how: str
) -> pd.DataFrame:
    """The paper's argument as a baseline: a study's probabilities from its slices' by max or mean pooling.

    patient_overall pools the slice-fracture probability; C1..C7 pool the per-vertebra fracture outputs.
    """
    pool = np.max if how == "max" else np.mean
    pooled = np.array([pool(slice_probs[uid][1], axis=0) for uid in uids], np.float64).reshape(
        -1, len(SLICE_OUTPUTS)
    )
    columns = [FRACTURE, *(fractured(k) for k in range(len(VERTEBRAE)))]
    return oof_table(uids, [slice_probs[uid][0] for uid in uids], pooled[:, columns])


def image_level_reports(slice_probs: dict[str, tuple[int, np.ndarray]], index: pd.DataFrame) -> list[dict]:
    """Table 2's rows per fold: labelled slices of each fold's studies, scored by that fold's CNN."""
    slice_labels = {
        uid: part.sort_values("order")["label"].to_numpy() for uid, part in index.groupby("StudyInstanceUID")
    }
    reports = []
    for fold in sorted({f for f, _ in slice_probs.values()}):
        y, p = [], []
        for uid, (f, probs) in slice_probs.items():
            if f != fold:
                continue
            known = slice_labels[uid] != UNKNOWN
            y.append(slice_labels[uid][known])
            p.append(probs[known, 0])
        y, p = np.concatenate(y), np.concatenate(p)
        if len(np.unique(y)) < 2:
            continue
        for data, metrics in paper_reports(y, p, seed=fold).items():
            reports.append({"Data": data, "fold": fold, **metrics})
    return reports


def case_level_reports(name: str, oof: pd.DataFrame, labels: pd.DataFrame) -> list[dict]:
    """Table 3's rows per fold for one model (patient_overall, threshold 0.5)."""
    reports = []
    for fold, part in oof.groupby("fold"):
        y = labels.loc[part["StudyInstanceUID"], "patient_overall"].to_numpy()
        if len(np.unique(y)) < 2:
            continue
        for data, metrics in paper_reports(y, part["p_patient_overall"].to_numpy(), seed=int(fold)).items():
            reports.append({"Model": name, "Data": data, "fold": fold, **metrics})
    return reports


def _auc(y: np.ndarray, p: np.ndarray) -> float:
    """ROC AUC, or NaN when one class is absent (a rare vertebra in a small run)."""
    return roc_auc_score(y, p) if len(np.unique(y)) == 2 else float("nan")


def scores(name: str, oof: pd.DataFrame, labels: pd.DataFrame) -> dict:
    """Competition loss (both forms) and per-target AUCs of one model's out-of-fold predictions."""
    y = labels.loc[oof["StudyInstanceUID"], list(TARGETS)].to_numpy()
    p = oof[p_columns()].to_numpy()
    row = {
        "Model": name,
        "loss (per study)": weighted_log_loss(y, p, "study"),
        "loss (global)": weighted_log_loss(y, p, "global"),
    }
    for i, t in enumerate(TARGETS):
        row[f"AUC {t}"] = _auc(y[:, i], p[:, i])
    return row


def vertebra_figure(score_table: pd.DataFrame, path: Path) -> Path:
    """Out-of-fold AUC of each model on each vertebra, side by side: can it say *which* vertebra?"""
    rows = score_table[~score_table["Model"].str.contains("prior|mean pooling")]
    fig, ax = plt.subplots(figsize=(8, 4.4))
    width = 0.8 / max(len(rows), 1)
    for i, (_, row) in enumerate(rows.iterrows()):
        aucs = [row[f"AUC {v}"] for v in VERTEBRAE]
        ax.bar(np.arange(len(VERTEBRAE)) + (i - (len(rows) - 1) / 2) * width, aucs, width, label=row["Model"])
    ax.axhline(0.5, color="k", ls=":", lw=1)
    ax.set(
        xticks=range(len(VERTEBRAE)),
        xticklabels=VERTEBRAE,
        ylim=(0, 1.05),
        ylabel="AUC, out of fold",
        title="Which vertebra is broken?",
    )
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, frameon=False)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


def roc_figure(models: dict[str, pd.DataFrame], labels: pd.DataFrame, path: Path) -> Path:
    """Out-of-fold ROC of patient_overall for every model; models that give the same answers (the vertebra
    track takes patient_overall from a BLSTM) share one curve, so none hides under another."""
    curves: list[tuple[np.ndarray, list[str]]] = []
    for name, oof in models.items():
        p = oof.sort_values("StudyInstanceUID")["p_patient_overall"].to_numpy()
        same = next((names for q, names in curves if len(q) == len(p) and np.allclose(q, p, atol=1e-6)), None)
        if same is None:
            curves.append((p, [name]))
        else:
            same.append(name)
    fig, ax = plt.subplots(figsize=(6.4, 6.6))
    for _, names in curves:
        oof = models[names[0]]
        y = labels.loc[oof["StudyInstanceUID"], "patient_overall"].to_numpy()
        if len(np.unique(y)) < 2:
            continue
        fpr, tpr, _ = roc_curve(y, oof["p_patient_overall"])
        label = " = ".join(names) + f" (AUC {roc_auc_score(y, oof['p_patient_overall']):.3f})"
        ax.plot(fpr, tpr, label=label, lw=2.2 if BLEND in names else 1.3)
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    ax.set(xlabel="1 − specificity", ylabel="sensitivity", title="Case level (patient_overall), out of fold")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), frameon=False)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)
    return path


def _reliability(ax, y: np.ndarray, p: np.ndarray, label: str, style: str) -> None:
    if len(np.unique(y)) < 2:
        return
    frac, mean = calibration_curve(y, p, n_bins=min(10, max(2, len(y) // 12)), strategy="quantile")
    ax.plot(mean, frac, style, label=label)


def calibration_figure(
    oof: pd.DataFrame, models: dict[str, pd.DataFrame], labels: pd.DataFrame, contrast: list[str], path: Path
) -> Path:
    """Reliability of what is submitted (``oof``, `submitted_predictions`): patient_overall (beside
    ``contrast`` models), and C1..C7 pooled."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6))
    y = labels.loc[oof["StudyInstanceUID"]]
    _reliability(
        axes[0],
        y["patient_overall"].to_numpy(),
        oof["p_patient_overall"].to_numpy(),
        "submitted",
        "o-",
    )
    for name in contrast:
        other = models[name]
        _reliability(
            axes[0],
            labels.loc[other["StudyInstanceUID"], "patient_overall"].to_numpy(),
            other["p_patient_overall"].to_numpy(),
            name,
            "s--",
        )
    _reliability(
        axes[1],
        y[list(VERTEBRAE)].to_numpy().ravel(),
        oof[p_columns(VERTEBRAE)].to_numpy().ravel(),
        "submitted",
        "o-",
    )
    q = np.linspace(0, 1, 101)
    for ax, title in zip(axes, ("patient_overall", "C1..C7, every vertebra of every study")):
        ax.plot([0, 1], [0, 1], "k:", lw=1, label="calibrated (predicted = observed)")
        ax.plot(2 * q / (1 + q), q, color="0.5", lw=1, label="the metric's best answer, 2q/(1+q)")
        ax.set(
            xlabel="predicted probability (mean of a bin)",
            ylabel="observed frequency of fractures",
            xlim=(0, 1),
            ylim=(0, 1),
            title=title,
        )
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(
        "Calibration, out of fold (bins of equal size). Positives weigh twice, so for an observed "
        "frequency q the metric rewards 2q/(1+q): the grey curve",
        fontsize=9,
    )
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)
    return path


def collect(paths: list[Path], out: Path, what: str, command: str) -> pd.DataFrame:
    """Every fold's out-of-fold predictions of one model, together (also written to ``out``).

    Raises:
        FileNotFoundError: a fold's file is missing; the message says which ``command`` makes it.
    """
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{what} predictions missing ({', '.join(missing)}): run `python -m cspine {command}` first"
        )
    oof = pd.concat([read_oof(p) for p in paths], ignore_index=True)
    write_csv(oof, out)
    return oof


def segmentation_scores(run: Run) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Out-of-fold Dice per vertebra (masked studies), and slice-level agreement with the true vertebra of
    every slice where the data has it (the synthetic competition's ``truth/``; evaluation only).

    Returns:
        The Dice table (one row per masked study), and per group of studies (with a mask: out of fold;
        without: all fold models) the share of slices whose level (the vertebra with most pixels) and
        whose set of C1..C7 shown both match the truth, or None without truth.
    """
    dice = pd.read_csv(run.seg_file("dice.csv"), dtype={"StudyInstanceUID": str})
    data_dir = run.data_dir()
    truth_path = data_dir / TRUTH_DIR / "vertebrae.csv" if data_dir else None
    if truth_path is None or not truth_path.is_file():
        return dice, None
    table = pd.read_csv(run.seg_file("vertebrae.csv"), dtype={"StudyInstanceUID": str})
    truth = pd.read_csv(truth_path, dtype={"StudyInstanceUID": str})
    both = table.merge(truth, on=["StudyInstanceUID", "slice_number"], suffixes=("", "_true"))
    both["group"] = np.where(
        both["StudyInstanceUID"].isin(dice["StudyInstanceUID"]), "with a mask (out of fold)", "without a mask"
    )
    if run.seg_file("checks.csv").is_file():  # does the check find the studies segmented wrong?
        checks = pd.read_csv(run.seg_file("checks.csv"), dtype={"StudyInstanceUID": str})
        passed = both["StudyInstanceUID"].map(checks.set_index("StudyInstanceUID")["passed"].astype(bool))
        both["group"] += np.where(passed, ", check passed", ", check failed")
    # the segmentation has one thoracic class (8); the truth names T2 (9) too
    both["level ok"] = both["level"] == both["level_true"].clip(upper=THORACIC)
    both["vertebrae ok"] = (
        both[list(VERTEBRAE)].to_numpy() == both[[f"{v}_true" for v in VERTEBRAE]].to_numpy()
    ).all(1)
    how = {
        "studies": ("StudyInstanceUID", "nunique"),
        "slices": ("level", "size"),
        "slice level": ("level ok", "mean"),
        "vertebrae shown": ("vertebrae ok", "mean"),
    }
    accuracy = pd.concat(
        [both.groupby("group").agg(**how), both.assign(group="every study").groupby("group").agg(**how)]
    ).reset_index()
    return dice, accuracy


def study_truth_dice(run: Run, data_dir: Path, uid: str) -> dict | None:
    """One study's Dice per vertebra between its predicted labels and its true ones (the synthetic
    competition's ``truth/labels``), the truth cut and resized into the cache's frame as its mask would be,
    and whether the scan reaches T2; None without truth."""
    truth = read_truth_labels(data_dir, uid)
    if truth is None or not run.seg_labels(uid).is_file():
        return None
    labels, numbers = truth
    pred, meta = load_labels(run.seg_labels(uid)), read_meta(run.cache.root, uid)
    row_of = {int(n): k for k, n in enumerate(numbers)}
    rows = labels[[row_of[int(n)] for n in meta["slice_numbers"]]]
    boxes = meta["crop"] * len(rows) if len(meta["crop"]) == 1 else meta["crop"]
    true = labels_in_cache_frame(rows, boxes, pred.shape[1])
    return {"StudyInstanceUID": uid, "long": bool((rows > THORACIC).any()), **dice_per_vertebra(pred, true)}


def truth_dice(run: Run) -> pd.DataFrame | None:
    """Dice per vertebra on every study whose true labels the data holds (`study_truth_dice`), with its group
    (a masked study is segmented out of fold; the others by every fold model) and scan length; None
    without truth (the real competition)."""
    data_dir = run.data_dir()
    if data_dir is None or not (data_dir / TRUTH_DIR / "labels").is_dir():
        return None
    masked = set(pd.read_csv(run.seg_file("dice.csv"), dtype={"StudyInstanceUID": str})["StudyInstanceUID"])
    uids = run.cache.read_index()["StudyInstanceUID"].unique()
    rows = [r for r in (study_truth_dice(run, data_dir, u) for u in uids) if r is not None]
    if not rows:
        return None
    table = pd.DataFrame(rows)
    table.insert(
        1,
        "group",
        np.where(table["StudyInstanceUID"].isin(masked), "with a mask (out of fold)", "without a mask"),
    )
    return table


def truth_dice_table(table: pd.DataFrame) -> pd.DataFrame:
    """`truth_dice`'s mean Dice per vertebra (and over C1..C7) per group and scan length, and over every study."""
    table = table.assign(scan=np.where(table["long"], "reaching T2", "shorter"))
    parts = [
        table.groupby(["group", "scan"])[list(VERTEBRAE)]
        .mean()
        .assign(studies=table.groupby(["group", "scan"]).size()),
        table.assign(group="every study", scan="all")
        .groupby(["group", "scan"])[list(VERTEBRAE)]
        .mean()
        .assign(studies=len(table)),
    ]
    out = pd.concat(parts).reset_index()
    out["mean"] = out[list(VERTEBRAE)].mean(axis=1)
    return out[["group", "scan", "studies", *VERTEBRAE, "mean"]]


def segmentation_section(run: Run) -> list[str]:
    """The report's segmentation lines (none when the run has no segmentation)."""
    if not run.seg_file("dice.csv").is_file():
        return []
    dice, accuracy = segmentation_scores(run)
    means = dice[list(VERTEBRAE)].mean()
    lines = [
        "## Segmentation",
        "",
        f"Out-of-fold Dice per vertebra on the {len(dice)} studies with a mask (mean {means.mean():.3f}):",
        "",
        means.to_frame("Dice").T.round(3).to_markdown(index=False),
        "",
    ]
    if run.seg_file("checks.csv").is_file():
        checks = pd.read_csv(run.seg_file("checks.csv"), dtype={"StudyInstanceUID": str})
        lines += [
            f"The vertebrae of {int(checks['passed'].sum())} of {len(checks)} studies pass their check (C1..C7 "
            "all found, in order from head to feet, of plausible heights, without a gap; `segment/checks.csv` "
            "says what fails); a failing study's slices are not labelled from its vertebrae.",
            "",
        ]
    pseudo = [pd.read_csv(path) for path in sorted(run.seg_pseudo_files())]
    if pseudo:
        used = ", ".join(f"{int(p['used'].sum())} of {len(p)}" for p in pseudo)
        lines += [
            f"Self-training: each fold's round-1 model labelled the unmasked studies, and round 2 also trained "
            f"on those whose labels pass the check and are confident enough: {used} (fold by fold; "
            "`segment/round1/pseudo<k>.csv`).",
            "",
        ]
    every = truth_dice(run)
    if every is not None:
        write_csv(every, run.report / "dice_every_study.csv")
        lines += [
            "Dice per vertebra on every study against its true labels (synthetic data only; "
            "`report/dice_every_study.csv`): the masked studies out of fold, the others by every fold model, "
            "whose training never read their truth:",
            "",
            truth_dice_table(every).round(3).to_markdown(index=False),
            "",
        ]
    if accuracy is not None:
        lines += [
            "Slices whose predicted vertebrae match the truth (synthetic data only):",
            "",
            accuracy.round(3).to_markdown(index=False),
            "",
        ]
    return lines


VERTEBRA_TRACK = "vertebra track (segmentation + CNN in each vertebra's slices + BiLSTM)"
CROP_TRACK = "crop track (each vertebra cut at full resolution + CNN + BiGRU)"
BLEND = "blend (level 2)"
BLEND_UNFLOORED = "blend, patient_overall without the floor"
PRIOR = "constant prior (2q/(1+q))"


def model_name(cfg: Config) -> str:
    """The slice CNN as the report names it, e.g. "ResNet-50" or "resnet10t ×0.5"."""
    name = {"resnet50": "ResNet-50"}.get(cfg.slice.backbone, cfg.slice.backbone)
    return name + (f" ×{cfg.slice.width:g}" if cfg.slice.width != 1 else "")


def submitted_columns(cfg: Config) -> dict[str, str]:
    """{target: the model whose output `predict` submits for it}, as the report names the models: the rule
    `cspine.ensemble.answering` gives predict, asked of the config's models."""
    names = {
        ensemble.BLEND: BLEND,
        ensemble.BLSTM: f"{model_name(cfg)} + BLSTM-{cfg.seq.hidden}",
        ensemble.VERTEBRA: VERTEBRA_TRACK,
        ensemble.CROP: CROP_TRACK,
    }
    answers = ensemble.answering(cfg.blend.enabled, cfg.vert.enabled, cfg.crop.enabled, cfg.vert.overall)
    return {t: names[model] for t, model in answers.items()}


def submitted_predictions(cfg: Config, models: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """What `predict` submits, out of fold: each target's column from the model `submitted_columns` names
    (a track's table holds its 1 − Π(1 − p_k) as patient_overall)."""
    columns = submitted_columns(cfg)
    frames = {name: models[name].set_index("StudyInstanceUID") for name in set(columns.values())}
    first = frames[columns[TARGETS[0]]]
    out = pd.DataFrame({"StudyInstanceUID": first.index, "fold": first["fold"].to_numpy()})
    for t, name in columns.items():
        out[f"p_{t}"] = frames[name].loc[first.index, f"p_{t}"].to_numpy()
    return out


def submitted_summary(cfg: Config) -> str:
    """Which model gives each submitted column, in words: "patient_overall from X; C1, ..., C7 from Y"."""
    by_model: dict[str, list[str]] = {}
    for t, name in submitted_columns(cfg).items():
        overall = t == TARGETS[0] and name in (VERTEBRA_TRACK, CROP_TRACK)
        by_model.setdefault(name + (", 1 − Π(1 − p_k)" if overall else ""), []).append(t)
    if len(by_model) == 1:
        return f"every target from {next(iter(by_model))}"
    return "; ".join(f"{', '.join(ts)} from {name}" for name, ts in by_model.items())


def loss_table(models: dict[str, pd.DataFrame], labels: pd.DataFrame) -> pd.DataFrame:
    """Per model: the per-study loss, how much of it patient_overall and C1..C7 carry, and the AUCs."""
    rows = []
    for name, oof in models.items():
        y = labels.loc[oof["StudyInstanceUID"], list(TARGETS)].to_numpy()
        p = oof[p_columns()].to_numpy()
        parts = loss_by_target(y, p)
        aucs = [_auc(y[:, i], p[:, i]) for i in range(1, len(TARGETS))]
        rows.append(
            {
                "model": name,
                "loss per study": parts.sum(),
                "of which patient_overall": f"{parts[0]:.3f} ({parts[0] / parts.sum():.0%})",
                "C1..C7 together": parts[1:].sum(),
                "patient_overall's own weighted loss": target_log_loss(y[:, 0], p[:, 0], "patient_overall"),
                "AUC patient_overall": _auc(y[:, 0], p[:, 0]),
                "AUC C1..C7 mean / min": f"{np.nanmean(aucs):.3f} / {np.nanmin(aucs):.3f}",
            }
        )
    return pd.DataFrame(rows)


def auc_interval_table(models: dict[str, pd.DataFrame], labels: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """Each model's AUC per target with its 95% bootstrap interval; the first row counts the positives."""
    uids = next(iter(models.values()))["StudyInstanceUID"]
    counts = {t: f"{int(labels.loc[uids, t].sum())} of {len(uids)}" for t in TARGETS}
    rows = [{"model": "fractured studies", **counts}]
    for name, oof in models.items():
        y = labels.loc[oof["StudyInstanceUID"]]
        row = {"model": name}
        for t in TARGETS:
            auc, lo, hi = bootstrap_auc(y[t].to_numpy(), oof[f"p_{t}"].to_numpy(), seed=seed)
            row[t] = f"{auc:.2f} [{lo:.2f}, {hi:.2f}]" if np.isfinite(auc) else "n/a"
        rows.append(row)
    return pd.DataFrame(rows)


def _coefficients(model: TargetModel, target: str) -> dict[str, float]:
    """{input: coefficient} of one target's model; a vertebra's name is written Ck (the shared model)."""
    if target == "patient_overall":
        return {**dict(zip(model.inputs, model.coef)), "intercept": model.intercept}
    generic = {name.replace(target, "Ck"): c for name, c in zip(model.inputs, model.coef)}
    return {**generic, f"intercept ({target})": model.intercept}


def coefficient_table(run: Run) -> pd.DataFrame | None:
    """Per input, the coefficient on the standardised input of the submitted blend (fitted on every study)
    and of each blend that scored a fold (fitted on the others): patient_overall's model, then the model
    the vertebrae share (inputs written Ck) with each vertebra's intercept. None without a blend."""
    if not run.blend_model.is_file():
        return None
    submitted = load_blend(run.blend_model)
    scorers = {f"scored fold {k}": load_blend(run.blend_scorer(k)) for k in submitted.folds}
    columns = {}
    for label, b in {"submitted": submitted, **scorers}.items():
        values = {
            ("patient_overall", name): c
            for name, c in _coefficients(b.targets["patient_overall"], "patient_overall").items()
        }
        for v in VERTEBRAE:  # the shared coefficients repeat in every vertebra: one row each
            values.update({("C1..C7", name): c for name, c in _coefficients(b.targets[v], v).items()})
        columns[label] = values
    keys = list(dict.fromkeys(k for values in columns.values() for k in values))
    rows = [
        {
            "target": t,
            "input": name,
            **{
                label: round(values[(t, name)], 3) if (t, name) in values else None
                for label, values in columns.items()
            },
        }
        for t, name in keys
    ]
    return pd.DataFrame(rows)


def opening(cfg: Config, models: dict[str, pd.DataFrame]) -> list[str]:
    """The report's first paragraph: the tracks, the blend, and which model gives each submitted column."""
    given = submitted_summary(cfg)
    lines = [
        "**What is scored here.** The *paper track* is Salehinejad et al.'s method: a slice CNN reads "
        "every slice in three CT windows, and a BLSTM reads the CNN's outputs over the whole study and "
        "answers all eight targets."
    ]
    if cfg.vert.enabled:
        lines.append(
            "The *vertebra track* segments the vertebrae first and reads the same CNN on each vertebra's "
            "own slices, one probability per vertebra."
        )
    if cfg.crop.enabled:
        lines.append(
            "The *crop track* cuts each segmented vertebra from the full-resolution study and reads "
            "its crops with a CNN of its own and a BiGRU, trained on every study's C1..C7 labels."
        )
    if BLEND in models:
        tracks = [
            name
            for name, on in (("the vertebra track", cfg.vert.enabled), ("the crop track", cfg.crop.enabled))
            if on
        ]
        lines.append(
            "The *blend* (level 2) is, per target, a logistic regression over the out-of-fold outputs "
            "of every model above (the BLSTMs, the CNN pooled over the study and over each vertebra's "
            "slices" + "".join(f", {t}" for t in tracks) + "), weighted as the "
            "metric weighs, so what it gives is a calibrated probability, not only a ranking."
        )
    lines.append(f"The submission takes {given}.")
    return [" ".join(lines), ""]


def crop_section(run: Run) -> list[str]:
    """How often the segmentation missed a vertebra, so that the crop track cut it where its neighbours
    put it (`cspine.crops.place_vertebrae`)."""
    places = pd.read_csv(run.crop_places, dtype={"StudyInstanceUID": str})
    missed = (~places["found"].astype(bool)).groupby(places["vertebra"]).sum().reindex(list(VERTEBRAE))
    studies = places["StudyInstanceUID"].nunique()
    table = pd.DataFrame([{"": "placed between its neighbours", **missed.astype(int).to_dict()}])
    return [
        "## The crop track",
        "",
        f"{studies} studies cut into crops of C1..C7. Where the segmentation found no vertebra, its crops were "
        f"cut where its neighbours put it; that happened {int(missed.sum())} times in {studies * len(VERTEBRAE)}:",
        "",
        table.to_markdown(index=False),
        "",
    ]


MAX_POOLING_NOTE = (
    "Max pooling ranks studies well and scores badly: the highest of a hundred slice "
    "probabilities is high in healthy studies too (one bright joint space is enough), so as a "
    "probability it is overconfident, while the order it puts studies in survives; the blend "
    "keeps the order and learns the calibration."
)


def holdout_section(run: Run) -> list[str]:
    """The held-out table (`python -m cspine holdout`) when it was made with the run's current models; else
    a line saying it is out of date."""
    table, record = run.holdout_dir / "holdout.md", run.holdout_dir / "record.json"
    if not table.is_file() or not record.is_file():
        return []
    if read_json(record)["models"] != run.digests(run.model_files()):
        return ["*The held-out score was made with other models: run `python -m cspine holdout` again.*", ""]
    return [table.read_text(), ""]


def evaluate(cfg: Config, run_dir: str | os.PathLike) -> Path:
    """Writes the report from the run's out-of-fold predictions; trains nothing (`train-seq` trains the sizes).

    Returns:
        The report folder, ``<run>/report``.
    """
    run = Run(run_dir)
    out = run.report
    save_config(cfg, out / "config.yaml")
    labels, index = run.read_labels(), run.cache.read_index()
    n_folds = cfg.folds.n_splits
    backbone = model_name(cfg)
    models: dict[str, pd.DataFrame] = {}
    for hidden in cfg.seq.sizes:
        models[f"{backbone} + BLSTM-{hidden}"] = collect(
            [run.seq_file(hidden, k, "oof.csv") for k in range(n_folds)],
            run.seq_oof(hidden),
            f"BLSTM-{hidden}",
            "train-seq",
        )
    uids = models[f"{backbone} + BLSTM-{cfg.seq.hidden}"]["StudyInstanceUID"].tolist()
    if cfg.vert.enabled:
        models[VERTEBRA_TRACK] = collect(
            [run.vert_file(k, "oof.csv") for k in range(n_folds)],
            run.vert_oof(),
            "vertebra-track",
            "train-vertebrae",
        )
    if cfg.crop.enabled:
        models[CROP_TRACK] = collect(
            [run.crop_file(k, "oof.csv") for k in range(n_folds)], run.crop_oof(), "crop-track", "train-crops"
        )
    if cfg.blend.enabled:
        blend = read_oof(run.blend_file("oof.csv"))
        models[BLEND] = blend.drop(columns="p_patient_overall_unfloored")
        models[BLEND_UNFLOORED] = blend.assign(p_patient_overall=blend["p_patient_overall_unfloored"])
    slice_probs = oof_slice_probs(run)  # read once: the pooling baselines and Table 2 share them
    for how in ("max", "mean"):
        models[f"{backbone}, {how} pooling"] = pooled_predictions(slice_probs, uids, how)
    prior = prior_from_train(labels.loc[uids].reset_index())
    models[PRIOR] = oof_table(
        uids,
        models[f"{backbone}, max pooling"]["fold"].to_numpy(),
        np.tile([prior[t] for t in TARGETS], (len(uids), 1)),
    )

    table2 = cv_table(image_level_reports(slice_probs, index), row_keys=("Data",))
    case_rows = [
        r for name, oof in models.items() if name != PRIOR for r in case_level_reports(name, oof, labels)
    ]
    table3 = cv_table(sorted(case_rows, key=lambda r: r["Data"] != "Imblcd."), row_keys=("Model", "Data"))
    score_table = pd.DataFrame([scores(name, oof, labels) for name, oof in models.items()])
    losses, intervals = loss_table(models, labels), auc_interval_table(models, labels)
    coefficients = coefficient_table(run) if cfg.blend.enabled else None
    write_table(table2, out / "table2", "Table 2 — image level (out-of-fold, mean ± std % over folds)")
    write_table(
        table3, out / "table3", "Table 3 — case level, patient_overall (out-of-fold, mean ± std % over folds)"
    )
    write_csv(score_table, out / "scores.csv")
    write_csv(losses, out / "loss.csv")
    write_csv(intervals, out / "auc_intervals.csv")
    roc_figure(
        {k: v for k, v in models.items() if k not in (PRIOR, BLEND_UNFLOORED)}, labels, out / "roc.png"
    )
    calibration_figure(
        submitted_predictions(cfg, models),
        models,
        labels,
        [f"{backbone}, max pooling", f"{backbone} + BLSTM-{cfg.seq.hidden}"],
        out / "calibration.png",
    )
    vertebra_figure(score_table[score_table["Model"] != BLEND_UNFLOORED], out / "vertebrae.png")

    fmt = score_table.copy()
    for col in fmt.columns[1:]:
        fmt[col] = fmt[col].map(("{:.4f}" if col.startswith("loss") else "{:.3f}").format)
    lines = [
        f"# Evaluation: {cfg.name}",
        "",
        *opening(cfg, models),
        *holdout_section(run),
        f"{len(uids)} studies, {n_folds}-fold cross-validation; every number below is out of fold (each study "
        "scored by models, the blend included, that never trained on it). BLSTM input: "
        f"`{cfg.seq.input}`, loss: `{cfg.seq.loss}`.",
        "",
        "## Where the loss is",
        "",
        "The competition's weighted log loss per study (lower is better; a constant 0.5 scores 0.6931), split "
        "into what patient_overall (weights 7 and 14) and the seven vertebrae (1 and 2 each) carry; then "
        "patient_overall's weighted log loss on its own (its weights only).",
        "",
        losses.to_markdown(index=False, floatfmt=".3f"),
        "",
        MAX_POOLING_NOTE,
        "",
        "## AUC with 95% bootstrap intervals",
        "",
        "Studies resampled 1,000 times within each class. With a handful of fractured studies (the first row) "
        "an interval spans much of the range: two models whose intervals overlap widely are not told apart "
        "by this run.",
        "",
        intervals.to_markdown(index=False),
        "",
        "![calibration](calibration.png)",
        "",
        *(
            [
                "## The blend's coefficients",
                "",
                "Per target, the logistic regression's coefficient on each standardised input (log-odds; "
                "`cspine.stacking` names them) and its intercept: the submitted blend, fitted on every study, and "
                "the blends that scored each fold, fitted on the other folds. A large weight on a weak model, or "
                "a sign that flips between folds, would show here.",
                "",
                coefficients.to_markdown(index=False),
                "",
            ]
            if coefficients is not None
            else []
        ),
        (out / "table2.md").read_text(),
        (out / "table3.md").read_text(),
        "## Every score",
        "",
        fmt.to_markdown(index=False),
        "",
        "![ROC](roc.png)",
        "",
        "![per vertebra](vertebrae.png)",
        "",
        *segmentation_section(run),
        *(crop_section(run) if cfg.crop.enabled else []),
    ]
    write_text(out / "report.md", "\n".join(lines))
    log.info("evaluate: report in %s", out / "report.md")
    return out
