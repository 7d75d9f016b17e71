"""Where and how training runs: device, mixed precision, seeds, and DistributedDataParallel under torchrun.

    torchrun --nproc_per_node=2 -m cspine train-slices --config paper fold=0

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; `init_distributed` joins the group (NCCL on GPUs, gloo
on CPU). Rank 0 alone logs and saves.
"""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Runtime:
    """The process's place in a (possibly distributed) run."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


class NoGPU(OSError):
    """A GPU was asked for (``device=cuda``) and none is visible; the message says where to look."""


def pick_device(name: str = "auto") -> torch.device:
    """ "auto" takes CUDA when present; "cpu"/"cuda"/"cuda:1" are taken as given.

    Raises:
        NoGPU: "cuda" asked for and no GPU visible (one line at the command line, not a traceback).
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise NoGPU(
            f"device={name!r} asked for, but no GPU is visible to torch {torch.__version__} "
            f"(CUDA build: {torch.version.cuda or 'none'}); on Kaggle, switch the notebook's accelerator "
            "on; elsewhere check nvidia-smi and CUDA_VISIBLE_DEVICES, or set device=auto"
        )
    return device


def pick_devices(name: str = "auto") -> list[torch.device]:
    """Every device `predict` may use: "auto" or "cuda" take every visible GPU (else the CPU, for "auto");
    "cpu" and "cuda:1" are taken as given."""
    if name in ("auto", "cuda") and torch.cuda.is_available():
        return [torch.device("cuda", k) for k in range(torch.cuda.device_count())]
    return [pick_device(name)]


def init_distributed(device: str = "auto") -> Runtime:
    """Joins the torchrun process group when WORLD_SIZE > 1; a single-process Runtime otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Runtime(pick_device(device))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    base = pick_device(device)
    if base.type == "cuda":
        torch.cuda.set_device(local_rank)
        base = torch.device("cuda", local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if base.type == "cuda" else "gloo")
    return Runtime(base, rank=rank, world_size=world, local_rank=local_rank)


def amp_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    """bf16 on GPUs of compute capability 8 or higher (A100, H100), else fp16 (Kaggle's T4 and P100, with a
    gradient scaler in training); None (full precision) on CPU or when disabled.

    `torch.cuda.is_bf16_supported()` alone answers True on a T4 (it counts emulation), where cuDNN has no
    bf16 convolutions: a CNN there would fail or crawl. The hardware decides, not the emulation.
    """
    if not enabled or device.type != "cuda":
        return None
    native = torch.cuda.get_device_capability(device)[0] >= 8
    return (
        torch.bfloat16
        if native and torch.cuda.is_bf16_supported(including_emulation=False)
        else torch.float16
    )


def autocast(device: torch.device, dtype: torch.dtype | None):
    """torch.amp autocast for the dtype, or a no-op context."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.amp.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    """Seeds Python, NumPy and torch (CPU and every GPU); NumPy integers (a fold read from a table) work too."""
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every global RNG's state, for checkpoints that resume exactly."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
