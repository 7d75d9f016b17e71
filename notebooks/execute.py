"""Executes the notebooks at the demo scale and saves them with their outputs, for readers who do not run them.

    python notebooks/execute.py                 # all six
    python notebooks/execute.py 01_eda 06       # some (a name's start is enough)

Each notebook runs with `SMOKE = False` set in a cell after its parameters (the demo: the main job's scale,
sharing `runs/demo`, so run `python -m cspine run` first or let the notebooks train it), still figures
(`CSPINE_STATIC=1`, so GitHub shows them, where a slider would show nothing) at 72 dpi. The saved notebook
keeps its own parameters cell, so a reader who runs it gets the quick smoke scale; it gains the outputs, and
must stay under 2 MB (`MAX_BYTES`), or the command fails and writes nothing. CI ignores the outputs: nbmake
executes every notebook from scratch.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from cspine.runs import write_text

HERE = Path(__file__).resolve().parent
MAX_BYTES = 2_000_000
INJECTED = (
    "SMOKE = False  # injected by notebooks/execute.py: the saved outputs are the demo's\n"
    "import matplotlib\n"
    "matplotlib.rcParams['figure.dpi'] = 72"
)


def relative_paths(nb, root: Path) -> None:
    """Writes the work folder's paths in the outputs relative to it (``runs/demo``, not this machine's
    ``/home/.../runs/demo``): a reader's machine has other folders, and the saved text must not leak ours."""
    prefix = str(root.resolve()) + "/"
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            if "text" in output:
                output["text"] = output["text"].replace(prefix, "")
            for kind in ("text/plain", "text/markdown", "text/html"):
                if kind in output.get("data", {}):
                    output["data"][kind] = output["data"][kind].replace(prefix, "")


WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def drop_widgets(nb) -> None:
    """Removes the widgets' outputs (tqdm's progress bars in a kernel): saved, a bar shows the state it was
    first drawn in ("0%"), and the widget itself needs a live kernel. The text the cells print stays."""
    for cell in nb.cells:
        if "outputs" in cell:
            cell["outputs"] = [o for o in cell["outputs"] if WIDGET_VIEW not in o.get("data", {})]
    nb.metadata.pop("widgets", None)  # a slider's saved state: meaningless without a kernel


def execute(path: Path) -> int:
    """Runs one notebook at the demo scale and writes it with its outputs; returns its size in bytes."""
    nb = nbformat.read(path, as_version=4)
    params = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    nb.cells.insert(params + 1, nbformat.v4.new_code_cell(INJECTED))
    NotebookClient(
        nb, timeout=3600, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}
    ).execute()
    del nb.cells[params + 1]
    relative_paths(nb, HERE.parent)  # the work folder: notebooks started here put input/ and runs/ there
    drop_widgets(nb)
    _, nb = nbformat.validator.normalize(nb)  # cell ids, so that nbformat's next versions read it
    text = nbformat.writes(nbformat.from_dict(nb))
    size = len(text.encode())
    if size > MAX_BYTES:
        raise SystemExit(
            f"{path.name}: {size / 1e6:.1f} MB with outputs, over {MAX_BYTES / 1e6:.0f} MB; "
            "make its figures smaller or fewer"
        )
    write_text(path, text)  # atomically: a killed run leaves the notebook as it was
    return size


def main(names: list[str]) -> None:
    os.environ["CSPINE_STATIC"] = "1"
    notebooks = sorted(HERE.glob("[0-9][0-9]_*.ipynb"))
    chosen = [p for p in notebooks if not names or any(p.stem.startswith(n) for n in names)]
    if not chosen:
        raise SystemExit(f"no notebook matches {names}; there are {', '.join(p.stem for p in notebooks)}")
    for path in chosen:
        started = time.perf_counter()
        size = execute(path)
        print(f"{path.name}: {size / 1e6:.2f} MB, {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
