"""Grad-CAM on the slice CNN (the paper's Fig. 3): where the network looks, beside the true boxes.

    python -m cspine explain --config demo fold=0      # PNGs in <run>/explain/

Uses the grad-cam package on the backbone's last stage and the slice-fracture logit.
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.patches import Rectangle
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from cspine.cache import load_study_images, read_meta
from cspine.checkpoints import load_slice_model
from cspine.competition import read_boxes
from cspine.inputs import slice_stack, to_tensor
from cspine.models import SliceNet
from cspine.preprocess import boxes_in_cache_frame
from cspine.runs import Run, save_figure


def grad_cam(model: SliceNet, image: np.ndarray, output: int = 0, size: int | None = None) -> np.ndarray:
    """Grad-CAM heatmap of one preprocessed slice.

    Args:
        model: a SliceNet (its last backbone stage is the target layer).
        image: uint8 [H, W, C] as the model reads it: a cached slice, or its `slice_stack` for a model
            with context.
        output: which logit to explain (0 = the slice's fracture label).
        size: the network's input side (default: the image's).

    Returns:
        float32 [H, W] in [0, 1], the image's own size.
    """
    model.eval()
    device = next(model.parameters()).device
    x = to_tensor(image[None], size or image.shape[0], device, channels_last=False)
    with GradCAM(model=model, target_layers=[model.cam_layer()]) as cam:
        heat = cam(input_tensor=x, targets=[ClassifierOutputTarget(output)])[0]
    if heat.shape != image.shape[:2]:
        heat = torch.nn.functional.interpolate(
            torch.from_numpy(heat)[None, None], size=image.shape[:2], mode="bilinear", align_corners=False
        )[0, 0].numpy()
    return heat.astype(np.float32)


def save_cam_figure(
    image: np.ndarray,
    heat: np.ndarray,
    path: str | os.PathLike,
    boxes: list[tuple[float, float, float, float]] = (),
    title: str = "",
) -> Path:
    """The slice (gross bone window channel), its Grad-CAM overlay and ground-truth boxes (x, y, w, h), as PNG."""
    fig, axes = plt.subplots(1, 2, figsize=(8, 4.2))
    for ax in axes:
        ax.imshow(image[..., 2], cmap="gray")
        ax.axis("off")
        for x, y, w, h in boxes:
            ax.add_patch(Rectangle((x, y), w, h, fill=False, edgecolor="red", linewidth=1.5))
    axes[1].imshow(heat, cmap="jet", alpha=0.45)
    axes[0].set_title("slice and true boxes" if boxes else "slice")
    axes[1].set_title("Grad-CAM")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return Path(path)


def explain_fold(
    run_dir: str | os.PathLike, fold: int, data_dir: str | os.PathLike, n: int = 6, device: str = "cpu"
) -> list[Path]:
    """Grad-CAM figures for up to ``n`` boxed slices of fold ``fold``'s held-out studies (its own CNN)."""
    run = Run(run_dir)
    model, _ = load_slice_model(run.slice_best(fold), device)
    folds = run.read_folds()
    boxes = read_boxes(data_dir)
    held_out = set(folds.loc[folds["fold"] == fold, "StudyInstanceUID"])
    written = []
    for uid, study_boxes in boxes[boxes["StudyInstanceUID"].isin(held_out)].groupby("StudyInstanceUID"):
        meta = read_meta(run.cache.root, uid)
        images = load_study_images(run.cache.root, uid)
        numbers = meta["slice_numbers"]
        picks = study_boxes.drop_duplicates("slice_number")
        for number in picks["slice_number"].iloc[len(picks) // 2 : len(picks) // 2 + 1]:
            k = numbers.index(int(number))
            crop = meta["crop"][0] if len(meta["crop"]) == 1 else meta["crop"][k]
            mapped = boxes_in_cache_frame(
                study_boxes[study_boxes["slice_number"] == number].to_dict("records"),
                tuple(crop),
                images.shape[1],
            )
            heat = grad_cam(model, slice_stack(images, [k], model.context)[0])
            written.append(
                save_cam_figure(
                    np.asarray(images[k]),
                    heat,
                    run.explain / f"fold{fold}_{uid}_{number}.png",
                    mapped,
                    title=f"{uid}, slice {number}",
                )
            )
        if len(written) >= n:
            break
    return written
