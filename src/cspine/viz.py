"""Figures for the notebooks, the README and the report: the study viewer, windows, the crop, training
curves; the report's ROC, calibration and per-vertebra AUCs.

The notebooks' figures are returned (a notebook shows it, a script saves it); the report's are saved to the
path given, which is returned.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import pyplot as plt
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from sklearn.calibration import calibration_curve
from sklearn.metrics import roc_auc_score, roc_curve

from cspine import TARGETS, VERTEBRAE
from cspine.dicom import Series
from cspine.metrics import p_columns
from cspine.preprocess import (
    GROSS_BONE,
    WINDOWS,
    _body,
    _window_u8,
    otsu_crop_box,
    otsu_threshold,
    spine_mask,
    window,
)
from cspine.runs import save_figure

BONE_VIEW = (400.0, 1800.0)  # center, width: the standard bone window, for display


def plot_window_functions() -> Figure:
    """The paper's Fig. 2: each window as a function of HU."""
    hu = np.linspace(-1000, 2000, 600)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for name, center, width in WINDOWS:
        ax.plot(hu, window(hu, center, width), label=f"{name.replace('_', ' ')} (c{center:g}, w{width:g})")
    ax.set(
        xlabel="Hounsfield units",
        ylabel="channel value",
        title="The three windows (Salehinejad et al., Fig. 2)",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def show_windows(hu: np.ndarray) -> Figure:
    """One slice in HU and as each window, and the three stacked as RGB."""
    fig, axes = plt.subplots(1, 5, figsize=(17, 3.8))
    axes[0].imshow(np.clip(hu, -1024, 2000), cmap="gray")
    axes[0].set_title("HU (−1024…2000)")
    for ax, (name, center, width) in zip(axes[1:4], WINDOWS):
        ax.imshow(window(hu, center, width), cmap="gray", vmin=0, vmax=1)
        ax.set_title(name.replace("_", " "))
    axes[4].imshow(np.stack([window(hu, c, w) for _, c, w in WINDOWS], axis=-1))
    axes[4].set_title("stacked as RGB")
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    return fig


def show_crop_steps(hu: np.ndarray, margin: float = 0.05) -> Figure:
    """The crop step by step: gross bone window and its Otsu histogram, bone inside the body, the spine, the box."""
    gross = _window_u8(hu, *GROSS_BONE[1:])
    body = _body(hu)
    inside = body[0] if body is not None else np.ones_like(hu, bool)
    threshold = otsu_threshold(gross[inside])
    mask = spine_mask(hu)
    y0, y1, x0, x1 = otsu_crop_box(hu, margin)
    fig, axes = plt.subplots(1, 5, figsize=(19, 3.8))
    axes[0].imshow(gross, cmap="gray")
    axes[0].set_title("gross bone window")
    axes[1].hist(gross[inside].ravel(), bins=64, color="grey", log=True)
    axes[1].axvline(threshold, color="red")
    axes[1].set_title(f"inside the body: Otsu at {threshold}")
    axes[2].imshow((gross > threshold) & inside, cmap="gray")
    axes[2].set_title("bone inside the body")
    axes[3].imshow(window(hu, *BONE_VIEW), cmap="gray")
    if mask is not None:
        axes[3].contour(mask, levels=[0.5], colors="lime", linewidths=0.8)
    axes[3].add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="red", lw=1.5))
    axes[3].set_title("spine and box (+5%)")
    axes[4].imshow(np.stack([window(hu[y0:y1, x0:x1], c, w) for _, c, w in WINDOWS], axis=-1))
    axes[4].set_title("cropped, three windows")
    for ax in (axes[0], axes[2], axes[3], axes[4]):
        ax.axis("off")
    fig.tight_layout()
    return fig


def show_images(images: np.ndarray, titles: list[str] | None = None, cols: int = 6) -> Figure:
    """A grid of uint8 [N, H, W, 3] images (or normalised float [N, 3, H, W] tensors)."""
    images = np.asarray(images)
    if images.ndim == 4 and images.shape[1] == 3:
        images = images.transpose(0, 2, 3, 1)
        images = (images - images.min()) / max(images.max() - images.min(), 1e-6)
    rows = int(np.ceil(len(images) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.4 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i, (ax, image) in enumerate(zip(axes.ravel(), images)):
        ax.imshow(image)
        if titles:
            ax.set_title(titles[i], fontsize=8)
    fig.tight_layout()
    return fig


def plot_history(history: pd.DataFrame, title: str = "") -> Figure:
    """Training and validation loss, and validation AUC, per epoch."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    axes[0].plot(history["epoch"], history["train_loss"], "o-", label="train")
    axes[0].plot(history["epoch"], history["val_loss"], "o-", label="validation")
    axes[0].set(xlabel="epoch", ylabel="loss")
    axes[0].legend()
    axes[1].plot(history["epoch"], history["val_auc"], "o-", color="C2")
    axes[1].set(xlabel="epoch", ylabel="slice AUC (validation)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_prevalence(train: pd.DataFrame) -> Figure:
    """Share of studies with each target positive."""
    fig, ax = plt.subplots(figsize=(7, 3.2))
    prevalence = train[list(TARGETS)].mean() * 100
    ax.bar(prevalence.index, prevalence.to_numpy(), color=["C3"] + ["C0"] * len(VERTEBRAE))
    for i, v in enumerate(prevalence.to_numpy()):
        ax.text(i, v + 0.5, f"{v:.1f}%", ha="center", fontsize=8)
    ax.set(ylabel="% of studies", title=f"Label prevalence ({len(train)} studies)")
    fig.tight_layout()
    return fig


def vertebra_colour(label: int) -> tuple[float, float, float, float]:
    """The colour of mask label ``label`` (1..7 = C1..C7, 8 = thoracic) in every figure: tab10's label-th
    colour, so an outline and its name always match."""
    return plt.cm.tab10((label - 1) % 10)


def _display(plane: np.ndarray) -> tuple[np.ndarray, dict]:
    """What to show of a plane and imshow's arguments: HU in the bone window, or the cache's uint8 [.., .., 3]
    as its three windows in colour (what the CNN sees). Planes only: a slider frame never windows a volume."""
    if plane.ndim == 3:
        return plane, {}
    return window(plane, *BONE_VIEW), {"cmap": "gray", "vmin": 0, "vmax": 1}


def _outline(planes) -> None:
    """Each label's outline on each (axes, label plane), alone and in its own label's colour: C1..C7, then
    the thoracic class."""
    for ax, plane in planes:
        for v in range(1, len(VERTEBRAE) + 2):
            if (plane == v).any():
                ax.contour(
                    (plane == v).astype(np.float32), levels=[0.5], colors=[vertebra_colour(v)], linewidths=0.8
                )


def _name_vertebrae(ax, plane: np.ndarray) -> None:
    """C1..C7's names beside a sagittal label plane [N, H], level with each, outside the image: the slice
    cursor crosses the image, never a name."""
    width = plane.shape[1]
    for v in range(1, len(VERTEBRAE) + 1):
        counts = (plane == v).sum(axis=1)
        if counts.any():  # at the row it fills most: a few stray pixels elsewhere do not move the name
            ax.text(
                width + 1,
                int(counts.argmax()),
                VERTEBRAE[v - 1],
                color=vertebra_colour(v),
                fontsize=8,
                va="center",
                clip_on=False,
            )


def counting_figure(image: np.ndarray, panels: dict[str, np.ndarray], title: str = "") -> Figure:
    """One sagittal plane of a study (the cache's uint8 [N, S, 3]) beside its labels [N, S] as each of
    ``panels`` gives them ({title: labels}, e.g. the truth, the network's own, counted between the discs):
    each vertebra outlined in its colour and named level with it."""
    fig, axes = plt.subplots(1, 1 + len(panels), figsize=(2.6 * (1 + len(panels)), 5.2), sharey=True)
    shown, kwargs = _display(image)
    axes[0].imshow(shown, aspect="auto", **kwargs)
    axes[0].set(title="the scan (sagittal)", ylabel="slice, head to feet")
    for ax, (name, labels) in zip(axes[1:], panels.items()):
        ax.imshow(shown, aspect="auto", alpha=0.35, **kwargs)
        _outline([(ax, labels)])
        _name_vertebrae(ax, labels)
        ax.set_title(name)
    for ax in axes:
        ax.set_xticks([])
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def _strip(ax, slice_probs: dict, truth: np.ndarray | None, k: int, n: int) -> None:
    """The per-slice outputs along the study, the slices known fractured shaded, a marker at slice ``k``; the
    axis runs a little past 1 so that a curve at 1 shows whole."""
    if truth is not None:
        ax.fill_between(
            np.arange(n),
            0,
            np.asarray(truth) > 0,
            step="mid",
            color="red",
            alpha=0.15,
            label="fractured slices (truth)",
        )
    for name, values in slice_probs.items():
        ax.plot(np.asarray(values, dtype=float), lw=1, label=name)
    ax.axvline(k, color="goldenrod", lw=1)
    ax.set(xlim=(0, n - 1), ylim=(0, 1.05), xlabel="slice (head → feet)", ylabel="probability")
    ax.legend(fontsize=7, loc="upper right", ncol=4)


def draw_study(
    volume: np.ndarray,
    k: int,
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    boxes: list | None = None,
    mask: np.ndarray | None = None,
    cam: dict | None = None,
    slice_probs: dict | None = None,
    truth: np.ndarray | None = None,
    column: int | None = None,
    title: str = "",
) -> Figure:
    """One frame of the study viewer: axial slice ``k`` beside sagittal and coronal reformats, and the
    per-slice predictions along the study beneath, with a marker at ``k``.

    Args:
        volume: HU [N, H, W] (`Series.hu`) or cached uint8 [N, S, S, 3], head to feet.
        spacing: (dz, dy, dx) in mm, for the reformats' aspect.
        boxes: [[k, x0, y0, x1, y1], ...] in the volume's pixels (a cache's ``meta["boxes"]``, or
            `competition_boxes` for a loaded series): drawn red on the axial slice, marked on the sagittal.
        mask: vertebra labels [N, H, W] (0 none, 1..7 C1..C7), outlined in each view.
        cam: {slice: heat [H, W] in 0..1} (Grad-CAM, `cspine.explain.grad_cam`), laid over the axial slice.
        slice_probs: {name: float [N]} per-slice outputs (a CNN's fracture probability, a vertebra's).
        truth: 0/1 [N], the slices known fractured, shaded in the predictions' strip.
        column: sagittal column (default: the middle).
    """
    n, h, w = volume.shape[:3]
    k = int(np.clip(k, 0, n - 1))
    column = w // 2 if column is None else column
    row = h // 2 + h // 10  # the coronal plane through the vertebral bodies, in front of the canal
    dz, dy, _ = spacing
    aspect = dz / dy if np.isfinite(dz) and dy > 0 else 1.0
    fig = plt.figure(figsize=(13, 6.6 if slice_probs else 4.6))
    grid = fig.add_gridspec(2 if slice_probs else 1, 3, height_ratios=[3, 1.1] if slice_probs else [1])
    axial, sagittal, coronal = (fig.add_subplot(grid[0, i]) for i in range(3))
    image, style = _display(volume[k])
    axial.imshow(image, **style)
    axial.set_title(f"axial, slice {k} of {n}")
    if cam is not None and k in cam:
        axial.imshow(cam[k], cmap="jet", alpha=0.35, vmin=0, vmax=1, extent=(-0.5, w - 0.5, h - 0.5, -0.5))
    for kk, x0, y0, x1, y1 in boxes or []:
        if int(kk) == k:
            axial.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="red", lw=1.5))
    sagittal.imshow(_display(volume[:, :, column])[0], aspect=aspect, **style)
    sagittal.set_title("sagittal (head at the top)")
    coronal.imshow(_display(volume[:, row, :])[0], aspect=aspect, **style)
    coronal.set_title("coronal")
    for kk in sorted({int(b[0]) for b in boxes or []}):
        sagittal.axhline(kk, color="red", lw=0.4, alpha=0.5)
    for ax in (sagittal, coronal):
        ax.axhline(k, color="yellow", lw=0.8)
    if mask is not None:
        _outline(((axial, mask[k]), (sagittal, mask[:, :, column]), (coronal, mask[:, row, :])))
        _name_vertebrae(sagittal, mask[:, :, column])
    for ax in (axial, sagittal, coronal):
        ax.axis("off")
    if slice_probs:
        _strip(fig.add_subplot(grid[1, :]), slice_probs, truth, k, n)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def competition_boxes(series: Series, boxes: pd.DataFrame) -> list[list[float]]:
    """A study's rows of train_bounding_boxes.csv as [[k, x0, y0, x1, y1], ...] in the loaded series' order."""
    order = {int(s): k for k, s in enumerate(series.slice_numbers)}
    return [
        [order[int(b.slice_number)], b.x, b.y, b.x + b.width, b.y + b.height]
        for b in boxes.itertuples()
        if int(b.slice_number) in order
    ]


def _ipython():
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    return get_ipython()


def in_kernel() -> bool:
    """Whether a Jupyter kernel runs this code (a slider can work), and ``CSPINE_STATIC`` does not ask for
    still figures (set when the committed notebooks are executed, so GitHub shows every figure)."""
    shell = _ipython()
    return shell is not None and hasattr(shell, "kernel") and not os.environ.get("CSPINE_STATIC")


def view_study(
    volume: np.ndarray, slice_index: int | None = None, interactive: bool | None = None, **overlays
):
    """The study viewer: `draw_study` with a slider through the axial slices when a kernel runs (ipywidgets),
    a still figure otherwise (scripts, CI, GitHub). ``overlays`` are `draw_study`'s keyword arguments.

    ``slice_index`` defaults to the middle of the boxed slices, else the most probable slice of the first
    per-slice prediction, else the middle. Under IPython the viewer shows itself (end the line with ``;``);
    it returns the widget, or the Figure.
    """
    n = len(volume)
    boxes, probs = overlays.get("boxes"), overlays.get("slice_probs")
    if slice_index is None:
        if boxes:
            slice_index = int(np.median([b[0] for b in boxes]))
        elif probs:
            slice_index = int(np.argmax(np.asarray(next(iter(probs.values())), dtype=float)))
        else:
            slice_index = n // 2
    shown = _ipython() is not None
    if not (in_kernel() if interactive is None else interactive):
        fig = draw_study(volume, slice_index, **overlays)
        if shown:  # shown once, here: closed, so that the inline backend does not show it again
            from IPython.display import display

            display(fig)
            plt.close(fig)
        return fig
    import ipywidgets
    from IPython.display import display

    def frame(k: int) -> None:
        fig = draw_study(volume, k, **overlays)
        display(fig)
        plt.close(fig)

    slider = ipywidgets.IntSlider(
        value=slice_index,
        min=0,
        max=n - 1,
        description="slice",
        continuous_update=False,
        layout=ipywidgets.Layout(width="60%"),
    )
    widget = ipywidgets.interactive(frame, k=slider)
    if shown:
        display(widget)
    return widget


def draw_blstm(slices: int = 6) -> Figure:
    """The paper's stage 2 as a picture: each slice's CNN features, read head to feet and feet to head by a
    bidirectional LSTM, pooled over the study (masked mean and max) into the eight targets."""
    fig, ax = plt.subplots(figsize=(11, 4.2))
    xs = np.arange(slices) * 1.6
    box = dict(boxstyle="round,pad=0.3", lw=0.8)
    for i, x in enumerate(xs):
        name = f"slice {i + 1}" if i < slices - 1 else "slice N"
        ax.text(x, 0, name, ha="center", va="center", fontsize=8, bbox={**box, "fc": "#dddddd"})
        ax.text(x, 1, "CNN\n→ features", ha="center", va="center", fontsize=7, bbox={**box, "fc": "#cfe2f3"})
        ax.text(x, 2.2, "LSTM →", ha="center", va="center", fontsize=7, bbox={**box, "fc": "#d9ead3"})
        ax.text(x, 2.9, "← LSTM", ha="center", va="center", fontsize=7, bbox={**box, "fc": "#fce5cd"})
        for y0, y1 in ((0.25, 0.7), (1.35, 1.95)):
            ax.annotate("", (x, y1), (x, y0), arrowprops={"arrowstyle": "->", "lw": 0.7})
        ax.annotate("", (x, 3.7), (x, 3.15), arrowprops={"arrowstyle": "->", "lw": 0.5, "color": "grey"})
    for i in range(slices - 1):
        forward, backward = (
            {"arrowstyle": "->", "color": "green"},
            {"arrowstyle": "->", "color": "darkorange"},
        )
        ax.annotate("", (xs[i + 1] - 0.45, 2.2), (xs[i] + 0.45, 2.2), arrowprops=forward)
        ax.annotate("", (xs[i] + 0.45, 2.9), (xs[i + 1] - 0.45, 2.9), arrowprops=backward)
    middle = xs.mean()
    ax.text(
        middle,
        4.0,
        "mean and max over the slices (padding masked)",
        ha="center",
        va="center",
        fontsize=8,
        bbox={**box, "fc": "#eeeeee"},
    )
    ax.annotate("", (middle, 4.7), (middle, 4.25), arrowprops={"arrowstyle": "->", "lw": 0.8})
    ax.text(
        middle,
        5.0,
        "linear → 8 probabilities: patient_overall, C1 … C7",
        ha="center",
        va="center",
        fontsize=9,
        bbox={**box, "fc": "#f4cccc"},
    )
    ax.text(xs[0] - 1.2, 0, "head", ha="right", va="center", fontsize=8, style="italic")
    ax.text(xs[-1] + 1.2, 0, "feet", ha="left", va="center", fontsize=8, style="italic")
    ax.set(xlim=(xs[0] - 1.8, xs[-1] + 1.8), ylim=(-0.5, 5.5))
    ax.axis("off")
    ax.set_title("Stage 2: a bidirectional LSTM reads the whole study, then decides once", fontsize=10)
    fig.tight_layout()
    return fig


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


def roc_figure(models: dict[str, pd.DataFrame], labels: pd.DataFrame, path: Path, bold: str = "") -> Path:
    """Out-of-fold ROC of patient_overall for every model (``bold``'s drawn thicker); models that give the same
    answers (the vertebra track takes patient_overall from a BLSTM) share one curve, so none hides under
    another."""
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
        ax.plot(fpr, tpr, label=label, lw=2.2 if bold in names else 1.3)
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
    oof: pd.DataFrame,
    models: dict[str, pd.DataFrame],
    labels: pd.DataFrame,
    contrast: list[str],
    path: Path,
    submitted: str = "submitted",
) -> Path:
    """Reliability of what is submitted (``oof``, `submitted_predictions`; ``submitted``: its legend),
    patient_overall beside ``contrast`` models, and C1..C7 pooled."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6))
    y = labels.loc[oof["StudyInstanceUID"]]
    _reliability(
        axes[0],
        y["patient_overall"].to_numpy(),
        oof["p_patient_overall"].to_numpy(),
        submitted,
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
        submitted,
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
