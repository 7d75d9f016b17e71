"""Worker processes that end with their parent, even when it is killed with -9.

A pool's workers otherwise outlive a killed `prepare` or `predict` (their parent becomes PID 1) and hold
memory and cores until someone finds them. Linux can signal a child when its parent dies
(``PR_SET_PDEATHSIG``); every pool of cspine starts its workers with `die_with_parent`. Elsewhere it does
nothing (the workers then end when they next find their queue closed).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # prctl(2)


def die_with_parent(parent: int) -> None:
    """Asks the kernel to end this process with SIGKILL when its parent dies (Linux only), and ends it now if
    its parent is no longer ``parent`` (the pool's owner died between the start and this call).

    A pool passes it as its initializer with the owner's PID: ``initializer=die_with_parent,
    initargs=(os.getpid(),)``.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:
        os._exit(1)
