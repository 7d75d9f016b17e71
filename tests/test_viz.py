"""The study viewer: still figures with every overlay, and a slider when a kernel runs."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest
from matplotlib import pyplot as plt
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from cspine.dicom import Series
from cspine.viz import competition_boxes, draw_study, view_study


@pytest.fixture
def study():
    n, h, w = 40, 48, 48
    hu = np.full((n, h, w), -1000.0, np.float32)
    hu[:, 20:30, 20:30] = 700.0
    mask = np.zeros((n, h, w), np.uint8)
    for v in range(1, 8):
        mask[(v - 1) * 5 : (v - 1) * 5 + 4, 20:30, 20:30] = v
    return hu, mask


def test_a_still_frame_draws_boxes_mask_cam_and_predictions_at_the_asked_slice(study):
    hu, mask = study
    probs = np.linspace(0, 1, len(hu))
    fig = draw_study(
        hu,
        12,
        spacing=(2.0, 1.0, 1.0),
        boxes=[[12, 20, 20, 30, 30], [13, 0, 0, 5, 5]],
        mask=mask,
        cam={12: np.ones((48, 48))},
        slice_probs={"fracture": probs},
        truth=probs > 0.5,
        title="s",
    )
    axial, sagittal, coronal, strip = fig.axes
    assert axial.get_title() == "axial, slice 12 of 40"
    # only slice 12's box
    assert [p.get_xy() for p in axial.patches if isinstance(p, Rectangle)] == [(20, 20)]
    assert len(axial.images) == 2  # the slice and the Grad-CAM over it
    labels = {t.get_text() for t in sagittal.texts}
    assert labels == {f"C{v}" for v in range(1, 8)}  # every vertebra named where the mask has it
    assert sagittal.images[0].get_array().shape == (40, 48)  # head-to-feet rows
    assert any(line.get_xdata()[0] == 12 for line in strip.lines)  # the marker at the slice shown
    plt.close(fig)


def test_without_predictions_there_is_no_strip_and_a_cached_study_shows_in_colour(study):
    hu, _ = study
    cached = np.zeros((len(hu), 32, 32, 3), np.uint8)
    fig = draw_study(cached, 100)  # clipped to the last slice
    assert len(fig.axes) == 3 and fig.axes[0].get_title() == "axial, slice 39 of 40"
    assert fig.axes[0].images[0].get_array().shape == (32, 32, 3)
    plt.close(fig)


def test_the_viewer_starts_at_the_boxes_or_the_most_probable_slice(study):
    hu, _ = study
    fig = view_study(hu, interactive=False, boxes=[[30, 1, 1, 2, 2], [32, 1, 1, 2, 2], [34, 1, 1, 2, 2]])
    assert isinstance(fig, Figure) and fig.axes[0].get_title() == "axial, slice 32 of 40"
    probs = np.zeros(len(hu))
    probs[7] = 0.9
    fig2 = view_study(hu, interactive=False, slice_probs={"fracture": probs})
    assert fig2.axes[0].get_title() == "axial, slice 7 of 40"
    plt.close("all")


def test_in_a_kernel_the_viewer_is_a_slider_that_redraws(study, monkeypatch):
    import ipywidgets

    import cspine.viz

    hu, mask = study
    drawn = []
    real = cspine.viz.draw_study
    monkeypatch.setattr(
        cspine.viz, "draw_study", lambda volume, k, **kw: drawn.append(k) or real(volume, k, **kw)
    )
    widget = view_study(hu, interactive=True, mask=mask)
    slider = widget.children[0]
    assert isinstance(widget, ipywidgets.interactive) and (slider.min, slider.max, slider.value) == (
        0,
        39,
        20,
    )
    slider.value = 5
    assert drawn[-1] == 5
    plt.close("all")


def test_competition_boxes_follow_the_series_order():
    series = Series(
        hu=np.zeros((3, 4, 4), np.float32),
        slice_numbers=np.array([9, 8, 7]),
        positions=np.zeros((3, 3)),
        spacing=(1, 1, 1),
        uid="u",
        paths=[],
    )
    boxes = pd.DataFrame(
        {"slice_number": [7, 5], "x": [1.0, 0], "y": [2.0, 0], "width": [3.0, 1], "height": [4.0, 1]}
    )
    assert competition_boxes(series, boxes) == [[2, 1.0, 2.0, 4.0, 6.0]]  # file 5 is not in the series


def test_the_blstm_picture_has_a_column_per_slice_and_the_eight_targets():
    from cspine.viz import draw_blstm

    fig = draw_blstm(slices=5)
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts.count("LSTM →") == 5 and texts.count("← LSTM") == 5 and "slice N" in texts
    assert any("8 probabilities" in t for t in texts)
    plt.close(fig)


def test_each_vertebras_outline_has_its_own_labels_colour(study):
    """C1 was drawn in C2's colour: contour levels 0.5..7.5 against label colours tab10(v/9)."""
    from matplotlib.colors import to_rgba

    from cspine.viz import vertebra_colour

    hu, mask = study
    fig = draw_study(hu, 2, mask=mask)  # slice 2: C1's
    axial, sagittal = fig.axes[:2]
    (outline,) = [c for c in axial.collections if len(c.get_paths()) and len(c.get_paths()[0].vertices)]
    assert np.allclose(to_rgba(outline.get_edgecolor()[0]), vertebra_colour(1))
    sagittal_colours = [tuple(c.get_edgecolor()[0]) for c in sagittal.collections if c.get_edgecolor().size]
    names = {t.get_text(): t.get_color() for t in sagittal.texts}
    for v in range(1, 8):  # every vertebra's outline and name share its colour, and only its
        assert any(np.allclose(colour, vertebra_colour(v)) for colour in sagittal_colours)
        assert np.allclose(to_rgba(names[f"C{v}"]), vertebra_colour(v))
    assert len({vertebra_colour(v) for v in range(1, 9)}) == 8
    plt.close(fig)


def test_the_counting_figure_shows_the_scan_and_names_each_panels_vertebrae_where_that_panel_puts_them():
    from cspine.viz import counting_figure

    n, s = 80, 24
    truth = np.zeros((n, s), np.uint8)
    for v in range(1, 9):  # C1..C7 and T1, a body every 8 slices
        truth[8 * v : 8 * v + 6, 6:18] = v
    late = np.where(truth >= 6, truth - 1, truth)  # the network's C5 over two bodies, each label below late
    image = np.zeros((n, s, 3), np.uint8)
    fig = counting_figure(image, {"the truth": truth, "the network's own": late}, "a study")
    assert len(fig.axes) == 3 and [a.get_title() for a in fig.axes[1:]] == ["the truth", "the network's own"]
    truth_names = {t.get_text(): t.get_position()[1] for t in fig.axes[1].texts}
    late_names = {t.get_text(): t.get_position()[1] for t in fig.axes[2].texts}
    assert sorted(truth_names) == [f"C{v}" for v in range(1, 8)] and truth_names["C7"] == 8 * 7
    assert "C7" in late_names and late_names["C7"] == 8 * 7 + 8  # named where that panel has it, a body lower
    plt.close(fig)
