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

from cspine import TARGETS, VERTEBRAE
from cspine.config import Config, save_config
from cspine.extract import load_features, oof_sources
from cspine.metrics import cv_table, paper_reports, weighted_log_loss, write_table
from cspine.prepare import UNKNOWN
from cspine.runs import Run, save_figure, write_csv, write_text
from cspine.submission import prior_from_train
from cspine.synthetic import TRUTH_DIR

log = logging.getLogger(__name__)


def oof_slice_probs(run_dir: str | os.PathLike) -> dict[str, tuple[int, np.ndarray]]:
    """{study: (fold, slice probabilities [N, 15])}, each from the CNN that never trained on the study."""
    return {uid: (fold, load_features(run_dir, fold, uid)[1]) for uid, fold in oof_sources(run_dir).items()}


def pooled_predictions(slice_probs: dict[str, tuple[int, np.ndarray]], uids: list[str], how: str) -> pd.DataFrame:
    """The paper's argument as a baseline: a study's probabilities from its slices' by max or mean pooling.

    patient_overall pools the slice-fracture probability; C1..C7 pool the per-vertebra fracture outputs.
    """
    rows = []
    for uid in uids:
        fold, probs = slice_probs[uid]
        pooled = probs.max(axis=0) if how == "max" else probs.mean(axis=0)
        rows.append({"StudyInstanceUID": uid, "fold": fold, "p_patient_overall": float(pooled[0]),
                     **{f"p_{v}": float(pooled[1 + i]) for i, v in enumerate(VERTEBRAE)}})
    return pd.DataFrame(rows)


def image_level_reports(slice_probs: dict[str, tuple[int, np.ndarray]], index: pd.DataFrame) -> list[dict]:
    """Table 2's rows per fold: labelled slices of each fold's studies, scored by that fold's CNN."""
    slice_labels = {uid: part.sort_values("order")["label"].to_numpy()
                    for uid, part in index.groupby("StudyInstanceUID")}
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


def scores(name: str, oof: pd.DataFrame, labels: pd.DataFrame) -> dict:
    """Competition loss (both forms) and per-target AUCs of one model's out-of-fold predictions."""
    y = labels.loc[oof["StudyInstanceUID"], list(TARGETS)].to_numpy()
    p = oof[[f"p_{t}" for t in TARGETS]].to_numpy()
    row = {"Model": name, "loss (per study)": weighted_log_loss(y, p, "study"),
           "loss (global)": weighted_log_loss(y, p, "global")}
    for i, t in enumerate(TARGETS):
        row[f"AUC {t}"] = roc_auc_score(y[:, i], p[:, i]) if len(np.unique(y[:, i])) == 2 else float("nan")
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
    ax.set(xticks=range(len(VERTEBRAE)), xticklabels=VERTEBRAE, ylim=(0, 1.05), ylabel="AUC, out of fold",
           title="Which vertebra is broken?")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, frameon=False)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


def _figures(models: dict[str, pd.DataFrame], labels: pd.DataFrame, out: Path, calibrated: str) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for name, oof in models.items():
        y = labels.loc[oof["StudyInstanceUID"], "patient_overall"].to_numpy()
        if len(np.unique(y)) < 2:
            continue
        fpr, tpr, _ = roc_curve(y, oof["p_patient_overall"])
        ax.plot(fpr, tpr, label=f"{name} (AUC {roc_auc_score(y, oof['p_patient_overall']):.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    ax.set(xlabel="1 − specificity", ylabel="sensitivity", title="Case level (patient_overall), out of fold")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    save_figure(fig, out / "roc.png", dpi=120)
    plt.close(fig)

    oof = models[calibrated]
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for t in ("patient_overall", "C2", "C7"):
        y = labels.loc[oof["StudyInstanceUID"], t].to_numpy()
        if len(np.unique(y)) < 2:
            continue
        frac, mean = calibration_curve(y, oof[f"p_{t}"], n_bins=min(8, max(2, len(y) // 6)), strategy="quantile")
        ax.plot(mean, frac, "o-", label=t)
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    ax.set(xlabel="predicted probability", ylabel="observed frequency", title=f"Calibration: {calibrated}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, out / "calibration.png", dpi=120)
    plt.close(fig)


def collect(paths: list[Path], out: Path, what: str, command: str) -> pd.DataFrame:
    """Every fold's out-of-fold predictions of one model, together (also written to ``out``).

    Raises:
        FileNotFoundError: a fold's file is missing; the message says which ``command`` makes it.
    """
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{what} predictions missing ({', '.join(missing)}): run "
                                f"`python -m cspine {command}` first")
    oof = pd.concat([pd.read_csv(p, dtype={"StudyInstanceUID": str}) for p in paths], ignore_index=True)
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
    data_dir = Path(run.data_dir_file.read_text().strip()) if run.data_dir_file.is_file() else None
    truth_path = data_dir / TRUTH_DIR / "vertebrae.csv" if data_dir else None
    if truth_path is None or not truth_path.is_file():
        return dice, None
    table = pd.read_csv(run.seg_file("vertebrae.csv"), dtype={"StudyInstanceUID": str})
    truth = pd.read_csv(truth_path, dtype={"StudyInstanceUID": str})
    both = table.merge(truth, on=["StudyInstanceUID", "slice_number"], suffixes=("", "_true"))
    both["group"] = np.where(both["StudyInstanceUID"].isin(dice["StudyInstanceUID"]), "with a mask (out of fold)",
                             "without a mask")
    both["level ok"] = both["level"] == both["level_true"]
    both["vertebrae ok"] = (both[list(VERTEBRAE)].to_numpy() == both[[f"{v}_true" for v in VERTEBRAE]].to_numpy()).all(1)
    accuracy = both.groupby("group").agg(studies=("StudyInstanceUID", "nunique"), slices=("level", "size"),
                                         **{"slice level": ("level ok", "mean"),
                                            "vertebrae shown": ("vertebrae ok", "mean")}).reset_index()
    return dice, accuracy


def segmentation_section(run: Run) -> list[str]:
    """The report's segmentation lines (none when the run has no segmentation)."""
    if not run.seg_file("dice.csv").is_file():
        return []
    dice, accuracy = segmentation_scores(run)
    means = dice[list(VERTEBRAE)].mean()
    lines = ["## Segmentation", "",
             f"Out-of-fold Dice per vertebra on the {len(dice)} studies with a mask (mean {means.mean():.3f}):", "",
             means.to_frame("Dice").T.round(3).to_markdown(index=False), ""]
    if accuracy is not None:
        lines += ["Slices whose predicted vertebrae match the truth (synthetic data only):", "",
                  accuracy.round(3).to_markdown(index=False), ""]
    return lines


VERTEBRA_TRACK = "vertebra track (segmentation + CNN in each vertebra's slices + BiLSTM)"


def model_name(cfg: Config) -> str:
    """The slice CNN as the report names it, e.g. "ResNet-50" or "resnet10t ×0.5"."""
    name = {"resnet50": "ResNet-50"}.get(cfg.slice.backbone, cfg.slice.backbone)
    return name + (f" ×{cfg.slice.width:g}" if cfg.slice.width != 1 else "")


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
        models[f"{backbone} + BLSTM-{hidden}"] = collect([run.seq_file(hidden, k, "oof.csv") for k in range(n_folds)],
                                                         run.seq_oof(hidden), f"BLSTM-{hidden}", "train-seq")
    uids = models[f"{backbone} + BLSTM-{cfg.seq.hidden}"]["StudyInstanceUID"].tolist()
    if cfg.vert.enabled:
        models[VERTEBRA_TRACK] = collect([run.vert_file(k, "oof.csv") for k in range(n_folds)], run.vert_oof(),
                                         "vertebra-track", "train-vertebrae")
    slice_probs = oof_slice_probs(run)  # read once: the pooling baselines and Table 2 share them
    for how in ("max", "mean"):
        models[f"{backbone}, {how} pooling"] = pooled_predictions(slice_probs, uids, how)
    prior = prior_from_train(labels.loc[uids].reset_index())
    models["constant prior (2q/(1+q))"] = pd.DataFrame(
        {"StudyInstanceUID": uids, "fold": models[f"{backbone}, max pooling"]["fold"],
         **{f"p_{t}": prior[t] for t in TARGETS}})

    table2 = cv_table(image_level_reports(slice_probs, index), row_keys=("Data",))
    case_rows = [r for name, oof in models.items() if "prior" not in name for r in case_level_reports(name, oof, labels)]
    table3 = cv_table(sorted(case_rows, key=lambda r: r["Data"] != "Imblcd."), row_keys=("Model", "Data"))
    score_table = pd.DataFrame([scores(name, oof, labels) for name, oof in models.items()])
    write_table(table2, out / "table2", "Table 2 — image level (out-of-fold, mean ± std % over folds)")
    write_table(table3, out / "table3", "Table 3 — case level, patient_overall (out-of-fold, mean ± std % over folds)")
    write_csv(score_table, out / "scores.csv")
    default_model = f"{backbone} + BLSTM-{cfg.seq.hidden}"
    _figures({k: v for k, v in models.items() if "prior" not in k}, labels, out, default_model)
    vertebra_figure(score_table, out / "vertebrae.png")

    fmt = score_table.copy()
    for col in fmt.columns[1:]:
        fmt[col] = fmt[col].map(lambda v: f"{v:.4f}" if col.startswith("loss") else f"{v:.3f}")
    lines = [
        f"# Evaluation: {cfg.name}", "",
        f"{len(uids)} studies, {n_folds}-fold cross-validation; every number is out of fold (each study scored "
        f"by a CNN and a BLSTM that never trained on it). BLSTM input: `{cfg.seq.input}`, loss: `{cfg.seq.loss}`.",
        "Balanced (Blcd.) rows use every positive and as many negatives drawn at random, as in the paper.", "",
        (out / "table2.md").read_text(), (out / "table3.md").read_text(),
        "## Competition metric and per-target AUC", "",
        "Weighted log loss (lower is better; a constant 0.5 scores 0.6931).", "",
        fmt.to_markdown(index=False), "",
        "![ROC](roc.png) ![calibration](calibration.png)", "", "![per vertebra](vertebrae.png)", "",
        *segmentation_section(run),
    ]
    write_text(out / "report.md", "\n".join(lines))
    log.info("evaluate: report in %s", out / "report.md")
    return out
