"""Stage `evaluate`: the paper's cross-validated tables and the competition score, from out-of-fold predictions.

    python -m cspine evaluate --config demo

Writes ``<run>/report/``: ``report.md`` (Table 2: image level; Table 3: BLSTM-96/128/256 with max and mean
pooling of slice probabilities beside them, balanced and imbalanced; competition scores in both
normalisations; per-vertebra AUCs), the tables as CSV, ``roc.png``, ``calibration.png`` and ``vertebrae.png``.
`cspine.scoring` computes the tables, `cspine.viz` draws the figures; this module writes them and the text.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from cspine import TARGETS, VERTEBRAE
from cspine.config import Config, save_config
from cspine.metrics import cv_table, oof_table, read_oof, write_table
from cspine.runs import Run, read_json, write_csv, write_text
from cspine.scoring import (
    BLEND,
    BLEND_UNFLOORED,
    CROP_TRACK,
    PRIOR,
    VERTEBRA_TRACK,
    auc_interval_table,
    case_level_reports,
    coefficient_table,
    image_level_reports,
    loss_table,
    model_name,
    oof_slice_probs,
    pooled_predictions,
    scores,
    segmentation_scores,
    submitted_columns,
    submitted_predictions,
    submitted_summary,
    truth_dice,
    truth_dice_table,
)
from cspine.submission import prior_from_train
from cspine.viz import calibration_figure, roc_figure, vertebra_figure

log = logging.getLogger(__name__)


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
        checks = run.read_checks()
        lines += [
            f"The vertebrae of {int(checks['counted'].sum())} of {len(checks)} studies were counted between "
            "the discs from C2 down (`seg.count`; the others keep the network's own labels).",
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


def opening(cfg: Config, models: dict[str, pd.DataFrame]) -> list[str]:
    """The report's first paragraph: the tracks, the blend, and which model gives each submitted column."""
    given = submitted_summary(cfg, bold=True)
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
    one = len(set(submitted_columns(cfg).values())) == 1
    lines.append(f"The submission takes {'every target from ' if one else ''}{given}.")
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


def out_of_fold_models(cfg: Config, run: Run, slice_probs: dict) -> dict[str, pd.DataFrame]:
    """{model as the report names it: its out-of-fold table}: the BLSTMs of every size, the tracks, the blend
    (with and without the floor), the CNN's max and mean pooling of ``slice_probs`` (`oof_slice_probs`), and
    the constant prior."""
    n_folds, backbone = cfg.folds.n_splits, model_name(cfg)
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
    for how in ("max", "mean"):
        models[f"{backbone}, {how} pooling"] = pooled_predictions(slice_probs, uids, how)
    prior = prior_from_train(run.read_labels().loc[uids].reset_index())
    models[PRIOR] = oof_table(
        uids,
        models[f"{backbone}, max pooling"]["fold"].to_numpy(),
        np.tile([prior[t] for t in TARGETS], (len(uids), 1)),
    )
    return models


def write_tables(
    cfg: Config, run: Run, models: dict[str, pd.DataFrame], slice_probs: dict
) -> dict[str, pd.DataFrame | None]:
    """The report's tables, each written as CSV (Tables 2 and 3 as markdown too); returns them by name."""
    out, labels = run.report, run.read_labels()
    table2 = cv_table(image_level_reports(slice_probs, run.cache.read_index()), row_keys=("Data",))
    case_rows = [
        r for name, oof in models.items() if name != PRIOR for r in case_level_reports(name, oof, labels)
    ]
    table3 = cv_table(sorted(case_rows, key=lambda r: r["Data"] != "Imblcd."), row_keys=("Model", "Data"))
    tables = {
        "scores": pd.DataFrame([scores(name, oof, labels) for name, oof in models.items()]),
        "loss": loss_table(models, labels),
        "auc_intervals": auc_interval_table(models, labels),
        "coefficients": coefficient_table(run) if cfg.blend.enabled else None,
    }
    write_table(table2, out / "table2", "Table 2 — image level (out-of-fold, mean ± std % over folds)")
    write_table(
        table3, out / "table3", "Table 3 — case level, patient_overall (out-of-fold, mean ± std % over folds)"
    )
    for name in ("scores", "loss", "auc_intervals"):
        write_csv(tables[name], out / f"{name}.csv")
    return tables


def draw_figures(cfg: Config, run: Run, models: dict[str, pd.DataFrame], score_table: pd.DataFrame) -> None:
    """roc.png, calibration.png (of what is submitted) and vertebrae.png in the report folder."""
    out, labels, backbone = run.report, run.read_labels(), model_name(cfg)
    shown = {k: v for k, v in models.items() if k not in (PRIOR, BLEND_UNFLOORED)}
    roc_figure(shown, labels, out / "roc.png", BLEND)
    calibration_figure(
        submitted_predictions(cfg, models),
        models,
        labels,
        [f"{backbone}, max pooling", f"{backbone} + BLSTM-{cfg.seq.hidden}"],
        out / "calibration.png",
        f"submitted: {submitted_summary(cfg)}",
    )
    vertebra_figure(score_table[score_table["Model"] != BLEND_UNFLOORED], out / "vertebrae.png")


def report_text(cfg: Config, run: Run, models: dict[str, pd.DataFrame], tables: dict) -> str:
    """report.md: every table and figure, with what they say."""
    out, n_folds = run.report, cfg.folds.n_splits
    uids = models[PRIOR]["StudyInstanceUID"]
    score_table, losses, intervals = tables["scores"], tables["loss"], tables["auc_intervals"]
    coefficients = tables["coefficients"]
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
    return "\n".join(lines)


def evaluate(cfg: Config, run_dir: str | os.PathLike) -> Path:
    """Writes the report from the run's out-of-fold predictions; trains nothing (`train-seq` trains the sizes).

    Returns:
        The report folder, ``<run>/report``.
    """
    run = Run(run_dir)
    save_config(cfg, run.report / "config.yaml")
    slice_probs = oof_slice_probs(run)  # read once: the pooling baselines and Table 2 share them
    models = out_of_fold_models(cfg, run, slice_probs)
    tables = write_tables(cfg, run, models, slice_probs)
    draw_figures(cfg, run, models, tables["scores"])
    write_text(run.report / "report.md", report_text(cfg, run, models, tables))
    log.info("evaluate: report in %s", run.report / "report.md")
    return run.report
