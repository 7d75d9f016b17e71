"""What every training loop shares: mixed precision, the DistributedDataParallel wrapper, an update step, and
the resumable state of a fold (as timm keeps these in `timm.utils` for its one `train.py`).

The slice CNN (`cspine.train_slices`), the crop model (`cspine.train_crops`) and the segmentation U-Net
(`cspine.segment`) train with these; nothing here knows which model it trains.
"""

from __future__ import annotations

import os

import torch
from torch.nn.parallel import DistributedDataParallel

from cspine.checkpoints import load_checkpoint, save_checkpoint
from cspine.runtime import Runtime, amp_dtype, rng_state, set_rng_state


def mixed_precision(device: torch.device, amp: bool) -> tuple[torch.dtype | None, torch.amp.GradScaler]:
    """The autocast dtype (`cspine.runtime.amp_dtype`: bf16 from compute capability 8, fp16 below, None on a
    CPU or with ``amp`` off) and a gradient scaler, enabled for fp16 alone (bf16 keeps fp32's range)."""
    dtype = amp_dtype(device, amp)
    return dtype, torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def distributed(model: torch.nn.Module, rt: Runtime) -> torch.nn.Module:
    """``model`` wrapped in DistributedDataParallel under torchrun, else ``model`` itself."""
    if not rt.distributed:
        return model
    return DistributedDataParallel(model, device_ids=[rt.local_rank] if rt.cuda else None)


def update(
    loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, clip: float = 0.0
) -> None:
    """One optimizer update from ``loss``: backward through the scaler, gradients clipped to norm ``clip``
    (0: not clipped) after unscaling, the step, the scaler's update, gradients cleared."""
    scaler.scale(loss).backward()
    optimizer_step(optimizer, scaler, clip)


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, clip: float = 0.0) -> None:
    """The update from gradients already accumulated (`update` without the backward)."""
    if clip:
        scaler.unscale_(optimizer)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def save_resume(
    path: str | os.PathLike,
    kind: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    epoch: int,
    history: list,
    ema: torch.nn.Module | None = None,
    **extra,
) -> None:
    """Everything `restore` needs to continue after ``epoch`` (0-based) exactly: weights, optimizer, scaler,
    EMA, the history so far, every RNG's state, and ``extra`` (what the loop itself keeps)."""
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "ema": ema.state_dict() if ema is not None else None,
        "epoch": epoch,
        "history": history,
        "rng": rng_state(),
        **extra,
    }
    save_checkpoint(state, path, kind)


def read_resume(path: str | os.PathLike, kind: str) -> dict | None:
    """The state `save_resume` wrote at ``path``, or None when there is none (a fold not started)."""
    return load_checkpoint(path, kind) if os.path.isfile(path) else None


def restore(
    state: dict,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    ema: torch.nn.Module | None = None,
) -> None:
    """Puts a `read_resume` state back: weights, optimizer, scaler, EMA and every RNG."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    if ema is not None:
        ema.load_state_dict(state["ema"])
    set_rng_state(state["rng"])
