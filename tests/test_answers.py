"""One rule says which model answers each target: `predict` submits by it and the report names by it."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
import torch

import cspine.predict
from cspine import TARGETS, VERTEBRAE
from cspine.config import load_config
from cspine.ensemble import Ensemble
from cspine.inputs import combine, logit
from cspine.predict import track_outputs
from cspine.scoring import (
    BLEND,
    CROP_TRACK,
    VERTEBRA_TRACK,
    model_name,
    submitted_columns,
    submitted_predictions,
)
from cspine.stacking import Blend, TargetModel

from .conftest import SMOKE_CONFIG

# one study's outputs of each model, every one distinct (the BLSTM's 8, each track's C1..C7, the blend's 8)
BLSTM = np.linspace(0.11, 0.18, 8)
TRACKS = {"vertebra": np.linspace(0.21, 0.27, 7), "crop": np.linspace(0.31, 0.37, 7)}
BLENDED = np.linspace(0.41, 0.48, 8)


def _blend() -> Blend:
    """A blend that answers BLENDED whatever it reads (intercepts only)."""
    targets = {t: TargetModel([], [], [], [], float(logit(q))) for t, q in zip(TARGETS, BLENDED)}
    return Blend(targets, False, None, 2, 0, [], False, False, False, [0], [], {}, [])


def _ensemble(blend: bool, vertebra: bool, crop: bool, overall: str) -> Ensemble:
    return Ensemble(
        cnns={},
        blstms={16: []},
        hidden=16,
        reading=None,
        arch={},
        input="probs",
        bins=0,
        tta=False,
        vertebra=[(None, None)] if vertebra else [],
        overall=overall,
        crops=[(None, None)] if crop else [],
        blend=_blend() if blend else None,
    )


def _report_tables(cfg) -> dict[str, pd.DataFrame]:
    """Each model's out-of-fold table for the one study, as the stages write them: a track's patient_overall
    is the BLSTM's with vert.overall=blstm (the vertebra track), else its 1 − Π(1 − p_k)."""

    def table(p):
        return pd.DataFrame(
            [{"StudyInstanceUID": "s", "fold": 0, **{f"p_{t}": v for t, v in zip(TARGETS, p)}}]
        )

    tables = {f"{model_name(cfg)} + BLSTM-{cfg.seq.hidden}": table(BLSTM), BLEND: table(BLENDED)}
    for name, track in ((VERTEBRA_TRACK, "vertebra"), (CROP_TRACK, "crop")):
        p = combine(TRACKS[track][None])[0]
        if track == "vertebra" and cfg.vert.overall == "blstm":
            p[0] = BLSTM[0]
        tables[name] = table(p)
    return tables


@pytest.mark.parametrize("overall", ["blstm", "vertebrae"])
@pytest.mark.parametrize("blend, vertebra, crop", list(itertools.product([False, True], repeat=3)))
def test_predict_and_the_report_take_each_target_from_the_same_model(blend, vertebra, crop, overall):
    """With the blend off and the crop track on, predict took patient_overall from the BLSTM while the report's
    "submitted" read the crop track's 1 − Π(1 − p_k)."""
    cfg = load_config(
        SMOKE_CONFIG,
        [
            f"blend.enabled={blend}",
            f"vert.enabled={vertebra}",
            f"crop.enabled={crop}",
            f"vert.overall={overall}",
        ],
    )
    ensemble = _ensemble(blend, vertebra, crop, overall)
    outputs = {
        "blstm": {16: {0: [BLSTM]}},
        "vertebra": {0: [TRACKS["vertebra"]]} if vertebra else None,
        "crop": {0: [TRACKS["crop"]]} if crop else None,
    }
    per_fold = {0: (None, np.full((6, 15), 0.5, np.float32))}

    def blstm_outputs(per_fold, ensemble, hidden, device):
        return outputs["blstm"][hidden]

    def vertebra_outputs(per_fold, extents, ensemble, device):
        return outputs["vertebra"]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cspine.predict, "blstm_outputs", blstm_outputs)
        mp.setattr(cspine.predict, "vertebra_outputs", vertebra_outputs)
        submitted = track_outputs(per_fold, None, ensemble, torch.device("cpu"), outputs["crop"])["submitted"]

    columns = submitted_columns(cfg)
    reported = submitted_predictions(cfg, _report_tables(cfg))
    assert np.allclose(submitted, reported[[f"p_{t}" for t in TARGETS]].to_numpy()[0]), columns
    # and what answers is what the settings say
    if blend:
        assert np.allclose(submitted, BLENDED)
    elif crop or vertebra:
        track = TRACKS["crop" if crop else "vertebra"]
        assert np.allclose(submitted[1:], track)
        assert np.isclose(submitted[0], BLSTM[0] if overall == "blstm" else 1 - np.prod(1 - track))
    else:
        assert np.allclose(submitted, BLSTM)
    assert set(columns) == set(TARGETS) and all(columns[v] == columns[VERTEBRAE[0]] for v in VERTEBRAE)
