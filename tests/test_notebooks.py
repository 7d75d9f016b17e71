"""The notebooks as documents: parameters a Kaggle fork can leave alone, exercises, references, saved outputs.

nbmake executes them (pytest's --nbmake); these tests read them.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("[0-9][0-9]_*.ipynb"))
PARAMETERS = ["DATA_DIR", "CONFIG", "OVERRIDES", "SMOKE", "WORK_DIR"]
REFERENCES = [
    "arxiv.org/abs/2010.13336",
    "kaggle.com/competitions/rsna-2022-cervical-spine-fracture-detection",
    "doi.org/10.1148/ryai.230034",
]


@pytest.fixture(params=NOTEBOOKS, ids=lambda p: p.stem)
def notebook(request):
    return request.param, nbformat.read(request.param, as_version=4)


def test_there_are_six_notebooks():
    assert [p.stem[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04", "05", "06"]


def test_the_parameters_cell_holds_the_five_parameters_and_the_setup_uses_them(notebook):
    _, nb = notebook
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1
    assigned = [t.id for node in ast.parse(cells[0].source).body for t in node.targets]
    assert assigned == PARAMETERS
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    calls = [
        node
        for node in ast.walk(ast.parse(code.replace("%", "#")))
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "notebook_setup"
    ]
    assert [[a.id for a in call.args[:5]] for call in calls] == [PARAMETERS]
    assert 'glob(f"{depth}/cspine-*.whl")' in code  # the kit installs from an attached dataset on Kaggle


def test_the_first_cell_says_how_to_run_it_here_and_on_kaggle(notebook):
    _, nb = notebook
    first = nb.cells[0].source
    assert nb.cells[0].cell_type == "markdown" and "**On Kaggle.**" in first and "**Run it.**" in first
    assert "python notebooks/execute.py" in first


def test_every_notebook_ends_with_exercises_and_names_its_references(notebook):
    _, nb = notebook
    exercises = next(c.source for c in reversed(nb.cells) if c.cell_type == "markdown")
    assert exercises.startswith("## Try this")
    assert 2 <= len(re.findall(r"^\d\. \*\*", exercises, re.M)) <= 3
    text = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    assert all(ref in text for ref in REFERENCES)


def test_the_saved_notebooks_show_figures_and_stay_small(notebook):
    path, nb = notebook
    assert path.stat().st_size < 2_000_000
    images = [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if "image/png" in o.get("data", {})
    ]
    assert images, f"{path.name} was saved without outputs: run python notebooks/execute.py"
    assert "widgets" not in nb.metadata  # a slider's state, which GitHub cannot show
    widgets = [
        i
        for i, c in enumerate(nb.cells)
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if "application/vnd.jupyter.widget-view+json" in o.get("data", {})
    ]
    assert not widgets, (
        f"{path.name} saves progress widgets in cells {widgets}: run python notebooks/execute.py"
    )


def test_notebook_01_works_the_metric_examples():
    nb = nbformat.read(NOTEBOOKS[0], as_version=4)
    text = "\n".join(c.source for c in nb.cells)
    assert "0.693" in text and "2q/(1+q)" in text and "weighted_log_loss" in text


def test_the_submission_notebook_only_submits_and_the_learning_notebook_points_to_it():
    import nbformat

    here = Path(__file__).resolve().parents[1] / "notebooks"
    nb = nbformat.read(here / "kaggle_submission.ipynb", as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert len(code) == 1 and "skip-execution" in code[0].metadata.get("tags", [])
    assert "kaggle_inference.py" in code[0].source and "attach exactly one" in code[0].source
    # no training
    assert not any(word in code[0].source for word in ("run_stages", "setup_run", "notebook_setup"))
    learning = nbformat.read(here / "05_inference_and_submission.ipynb", as_version=4)
    assert "kaggle_submission.ipynb" in learning.cells[0].source


def test_the_saved_outputs_hold_no_machine_paths(notebook):
    """Saved at the demo scale on one machine, read on every other: paths are relative to the work folder."""
    path, nb = notebook
    text = "\n".join(str(o) for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    found = re.findall(re.escape(str(path.resolve().parents[1])) + r"[\w./-]*|/tmp/[\w./-]+", text)
    assert not found, f"{path.name} saves {sorted(set(found))[:3]}"


@pytest.mark.slow
def test_the_executed_submission_notebook_fails_on_a_broken_bundle(tmp_path, monkeypatch):
    """Kaggle commits a notebook that ends without an error: a bundle that cannot submit must stop it.
    Executed as `jupyter nbconvert --execute` does, with a bundle made for another Python; the script's
    error reaches the notebook as an exception (under `%run` it was printed and the notebook went on)."""
    import json
    import shutil

    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    from cspine import kaggle_inference

    here = Path(__file__).resolve().parents[1] / "notebooks"
    bundle = tmp_path / "input" / "someones-bundle"
    bundle.mkdir(parents=True)
    shutil.copy(kaggle_inference.__file__, bundle / "kaggle_inference.py")
    (bundle / kaggle_inference.MARKER).write_text(json.dumps({"python": "2.7", "wheels": False}))
    monkeypatch.setenv("CSPINE_KAGGLE_INPUT", str(tmp_path / "input"))
    nb = nbformat.read(here / "kaggle_submission.ipynb", as_version=4)
    for cell in nb.cells:  # the cell is tagged to be skipped here (it needs /kaggle/input): run it
        cell.metadata["tags"] = []
    with pytest.raises(CellExecutionError, match="BundleError.*wheels are for Python 2.7"):
        NotebookClient(
            nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": tmp_path}}
        ).execute()
    shutil.rmtree(bundle)  # none attached: the cell's own check stops it too
    with pytest.raises(CellExecutionError, match="0 cspine bundles are attached"):
        NotebookClient(
            nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": tmp_path}}
        ).execute()
