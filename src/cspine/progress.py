"""Progress bars that suit where stderr goes: a terminal gets live bars, a log file gets no flood."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def progress(iterable=None, desc: str = "", steps: bool = False, enabled: bool = True, **kwargs) -> tqdm:
    """A tqdm bar on stderr that suits where stderr goes.

    Args:
        steps: a bar of many quick updates (training or validation steps, a study's slices). It shows only
            on a terminal: redirected to a file it would add a line a step, and the logger already writes
            one a epoch.
        enabled: False hides it (every rank but 0 under DDP).
        kwargs: passed to tqdm. Off a terminal, stage bars (studies) refresh at most every 30 s.
    """
    terminal = sys.stderr.isatty()
    return tqdm(
        iterable,
        desc=desc,
        disable=not enabled or (steps and not terminal),
        mininterval=0.1 if terminal else 30.0,
        **kwargs,
    )
