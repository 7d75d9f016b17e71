"""`python -m cspine holdout`: the run's models scored on studies that no model and no blend saw.

    python -m cspine holdout --config demo [--studies 256] [--seed 1]

Out-of-fold figures read each study through one fold's models, and the blend is fitted on those very
outputs; `predict` averages every fold's models, on studies none of them saw. On the demo the two
disagree (the blend gained 0.078 out of fold and 0.010 held out), so model choices are judged here too.

For a run on a synthetic competition it generates a held-out one in the run's own phantom settings (every
study a test study; its own seed, whose UIDs and volumes share nothing with the run's; cached beside the
run's data as ``<data>-holdout<seed>``), reads every study through the run's models as `predict` does,
and scores each model that could answer alone ("paper": the CNNs and the BLSTMs; the vertebra and crop
tracks) and what `predict` submits, against the labels the generator recorded (``truth/labels.csv``):
the competition's loss per study with its 95% bootstrap interval, patient_overall's part, AUC per target
with intervals, and the paired difference between the submission and each track (studies resampled
together). Writes ``<run>/holdout/``: ``answers.csv`` (every study's answers, cached while the models are
the same), ``scores.csv``, ``auc.csv``, ``holdout.md`` and ``record.json``; the report shows the table.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from cspine import TARGETS
from cspine.competition import TRUTH_DIR, list_test_studies, read_test
from cspine.config import Config, ConfigError, SynthConfig
from cspine.ensemble import check_complete, check_config, load_ensemble
from cspine.evaluate import evaluate
from cspine.metrics import auc, bootstrap_mean, loss_by_target, p_columns, study_losses, weighted_log_loss
from cspine.predict import predict_studies, predict_tracks
from cspine.runs import Run, read_json, write_csv, write_json, write_text
from cspine.runtime import pick_devices
from cspine.scoring import (
    CROP_TRACK,
    PRIOR,
    VERTEBRA_TRACK,
    auc_interval_table,
    model_name,
    submitted_out_of_fold,
    submitted_summary,
)
from cspine.submission import prior_from_train
from cspine.synthetic import make_competition, synthetic_settings

log = logging.getLogger(__name__)

STUDIES = 256  # enough positives a vertebra (about 20 of C1's) to tell two models apart
SUBMITTED = "submitted"


def held_out_settings(made: dict, studies: int, seed: int) -> SynthConfig:
    """The run's phantom settings (``made``: as its competition recorded them), every study a test study,
    drawn with ``seed``.

    Raises:
        ConfigError: a seed whose study UIDs would be the run's own.
    """
    if seed % 9000 == made["seed"] % 9000:  # `cspine.synthetic._study_uid` numbers studies by seed % 9000
        raise ConfigError(
            f"--seed {seed}: the run's competition was drawn with seed {made['seed']}, and the held-out studies "
            "would repeat its studies; choose another"
        )
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in made.items()}
    return SynthConfig(**{**fields, "n_train": 0, "n_test": studies, "seed": seed})


def held_out_competition(run: Run, cfg: Config, studies: int, seed: int | None) -> tuple[Path, int]:
    """The held-out synthetic competition of a run and its seed (default: the run's competition's + 1):
    generated once, reused while its settings hold.

    Raises:
        ConfigError: the run's data is not a synthetic competition (the real data's held-out score is
            Kaggle's leaderboard).
    """
    data = run.data_dir()
    made = synthetic_settings(data) if data else None
    if made is None:
        raise ConfigError(
            f"{run.root} was trained on {data or 'unknown data'}, not a synthetic competition: a held-out set "
            "is drawn in the run's phantom settings (on the real data, the leaderboard is the held-out score)"
        )
    seed = made["seed"] + 1 if seed is None else seed
    wanted = held_out_settings(made, studies, seed)
    folder = data.with_name(f"{data.name}-holdout{seed}")
    if synthetic_settings(folder) != json.loads(json.dumps(dataclasses.asdict(wanted))):
        log.info("holdout: %d studies drawn with seed %d in %s", studies, seed, folder)
        make_competition(folder, wanted, workers=max(1, min(cfg.prepare.workers, os.cpu_count() or 1)))
    return folder, seed


def track_names(cfg: Config) -> dict[str, str]:
    """{track: the name the report gives its model}: the held-out rows sit beside the out-of-fold ones."""
    return {
        "paper": f"{model_name(cfg)} + BLSTM-{cfg.seq.hidden}",
        "vertebra": VERTEBRA_TRACK,
        "crop": CROP_TRACK,
        SUBMITTED: f"what is submitted: {submitted_summary(cfg)}",
        "prior": PRIOR,
    }


def read_answers(run: Run, cfg: Config, data: Path, seed: int) -> pd.DataFrame:
    """Every held-out study's answers by every track (StudyInstanceUID, track, p_<target>, failed), read
    through the run's models as `predict` reads a test study; cached while the models and the set are the
    same. A study that fails gets the training prior for every track, as `predict` gives it."""
    made = {"models": run.digests(run.model_files()), "data": str(data), "seed": seed}
    answers, record = run.holdout_dir / "answers.csv", run.holdout_dir / "record.json"
    if answers.is_file() and record.is_file() and read_json(record) == made:
        return pd.read_csv(answers, dtype={"StudyInstanceUID": str})
    devices = pick_devices(cfg.device)
    ensemble = load_ensemble(
        run.root, cfg.seq.hidden, devices, cfg.vert.enabled, cfg.blend.enabled, cfg.crop.enabled
    )
    check_config(cfg, ensemble)
    check_complete(cfg, ensemble, run.root)
    uids = list_test_studies(data, read_test(data))
    paths = [data / "test_images" / u for u in uids]
    tracks, failed = predict_studies(paths, uids, ensemble, cfg, "holdout", answer=predict_tracks)
    prior = prior_from_train(run.read_labels().reset_index())
    names = sorted({name for answer in tracks.values() for name in answer}, key=list(track_names(cfg)).index)
    rows = [
        {
            "StudyInstanceUID": uid,
            "track": name,
            **{f"p_{t}": tracks[uid][name][t] if uid in tracks else prior[t] for t in TARGETS},
            "failed": uid in failed,
        }
        for uid in uids
        for name in names
    ]
    frame = pd.DataFrame(rows)
    write_csv(frame, answers)
    write_json(made, record)  # last: the answers are whole
    return frame


def score_table(
    answers: pd.DataFrame, labels: pd.DataFrame, oof: dict[str, float], names: dict[str, str]
) -> pd.DataFrame:
    """Per track: the loss per study with its interval, patient_overall's part, the AUCs, the paired
    difference to what is submitted (negative: the submission is better), and the out-of-fold loss
    (``oof``: by track)."""
    by_track = {
        name: frame.set_index("StudyInstanceUID") for name, frame in answers.groupby("track", sort=False)
    }
    uids = by_track[SUBMITTED].index
    y = labels.loc[uids, list(TARGETS)].to_numpy()
    p = {name: frame.loc[uids, p_columns()].to_numpy() for name, frame in by_track.items()}
    submitted = study_losses(y, p[SUBMITTED])
    rows = []
    for name in [n for n in names if n in p]:
        losses = study_losses(y, p[name])
        loss, lo, hi = bootstrap_mean(losses)
        parts = loss_by_target(y, p[name])
        aucs = [auc(y[:, i], p[name][:, i]) for i in range(len(TARGETS))]
        diff = bootstrap_mean(submitted - losses) if name != SUBMITTED else None
        rows.append(
            {
                "model": names[name],
                "held-out loss [95%]": f"{loss:.3f} [{lo:.3f}, {hi:.3f}]",
                "of which patient_overall": round(float(parts[0]), 3),
                "AUC patient_overall": round(aucs[0], 3),
                "AUC C1..C7 mean": round(float(np.nanmean(aucs[1:])), 3),
                "submitted − this [95%]": "—"
                if diff is None
                else f"{diff[0]:+.3f} [{diff[1]:+.3f}, {diff[2]:+.3f}]",
                "out-of-fold loss": oof.get(name, float("nan")),
            }
        )
    return pd.DataFrame(rows)


def out_of_fold_losses(run: Run, cfg: Config) -> dict[str, float]:
    """{track: its out-of-fold loss per study}, the report's (empty before `evaluate` wrote its tables); what
    is submitted from the same columns `predict` takes (`cspine.scoring.submitted_out_of_fold`)."""
    path = run.report / "loss.csv"
    if not path.is_file():
        return {}
    table = pd.read_csv(path)
    by_name = dict(zip(table["model"], table["loss per study"]))
    losses = {track: by_name[name] for track, name in track_names(cfg).items() if name in by_name}
    submitted = submitted_out_of_fold(cfg, run)
    labels = run.read_labels().loc[submitted["StudyInstanceUID"], list(TARGETS)]
    losses[SUBMITTED] = weighted_log_loss(labels.to_numpy(), submitted[p_columns()].to_numpy())
    return {track: round(float(loss), 3) for track, loss in losses.items()}


def holdout(
    cfg: Config, run_dir: str | os.PathLike, studies: int = STUDIES, seed: int | None = None
) -> pd.DataFrame:
    """Scores the run's models on a held-out synthetic competition (module docstring); returns the table."""
    run = Run(run_dir)
    data, seed = held_out_competition(run, cfg, studies, seed)
    answers = read_answers(run, cfg, data, seed)
    prior = prior_from_train(run.read_labels().reset_index())  # the yardstick: no model at all
    uids = answers["StudyInstanceUID"].unique()
    constant = pd.DataFrame(
        {"StudyInstanceUID": uids, "track": "prior", **{f"p_{t}": prior[t] for t in TARGETS}}
    )
    answers = pd.concat([answers, constant.assign(failed=False)], ignore_index=True)
    labels = pd.read_csv(data / TRUTH_DIR / "labels.csv", dtype={"StudyInstanceUID": str}).set_index(
        "StudyInstanceUID"
    )
    names = track_names(cfg)
    table = score_table(answers, labels, out_of_fold_losses(run, cfg), names)
    models = {
        names[name]: frame.drop(columns=["track", "failed"])
        for name, frame in answers.groupby("track", sort=False)
    }
    intervals = auc_interval_table(models, labels)
    failed = int(answers.drop_duplicates("StudyInstanceUID")["failed"].sum())
    write_csv(table, run.holdout_dir / "scores.csv")
    write_csv(intervals, run.holdout_dir / "auc.csv")
    lines = [
        "## Held out",
        "",
        f"{len(labels)} studies no model and no blend saw (`python -m cspine holdout`: the run's phantom settings, "
        f"seed {seed}; {failed} failed and got the prior), read through every fold's models as `predict` reads a "
        "test study. Loss: the competition's, per study, with its 95% bootstrap interval; *submitted − this*: "
        "the paired difference per study (negative: the submission does better), its interval from the same "
        "resampled studies; out of fold beside it.",
        "",
        table.to_markdown(index=False, floatfmt=".3f"),
        "",
        "AUC with 95% bootstrap intervals, held out:",
        "",
        intervals.to_markdown(index=False),
        "",
    ]
    write_text(run.holdout_dir / "holdout.md", "\n".join(lines))
    evaluate(cfg, run.root)  # the report shows the table
    log.info("holdout: %s", run.holdout_dir / "holdout.md")
    return table
