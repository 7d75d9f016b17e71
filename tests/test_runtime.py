"""Mixed precision follows the hardware: bf16 only where the GPU has it natively (not Kaggle's T4, P100)."""

from __future__ import annotations

import pytest
import torch

from cspine.runtime import amp_dtype


@pytest.mark.parametrize(
    "capability, dtype",
    [
        ((7, 5), torch.float16),  # T4
        ((6, 0), torch.float16),  # P100
        ((8, 0), torch.bfloat16),  # A100
        ((9, 0), torch.bfloat16),  # H100
    ],
)
def test_amp_dtype_follows_the_compute_capability(monkeypatch, capability, dtype):
    def bf16_supported(including_emulation=True):
        # as torch answers on a T4: True when emulation counts, False when it does not
        return including_emulation or capability[0] >= 8

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", bf16_supported)
    assert amp_dtype(torch.device("cuda", 0), enabled=True) == dtype


def test_no_mixed_precision_on_the_cpu_or_when_disabled():
    assert amp_dtype(torch.device("cpu"), enabled=True) is None
    assert amp_dtype(torch.device("cuda", 0), enabled=False) is None
