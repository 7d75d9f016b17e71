"""One figure, one source: what the README quotes of the rehearsal is what docs/gpu.md's table says, and the
figures the rehearsal replaced are gone."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
START, END = "<!-- rehearsal: start -->", "<!-- rehearsal: end -->"


def rehearsal_tables() -> dict[str, dict[str, list[str]]]:
    """docs/gpu.md's rehearsal block (`python -m cspine rehearse`'s table.md, pasted whole), as
    {first header cell: {row name: its cells}}."""
    text = (REPO / "docs" / "gpu.md").read_text()
    assert START in text and END in text, "docs/gpu.md lost its rehearsal block"
    block = text[text.index(START) : text.index(END)]
    tables: dict[str, dict[str, list[str]]] = {}
    header = None
    for line in block.splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if header is None:
            header = cells[0]
            tables[header] = {}
        elif not set(cells[0]) <= set("-"):
            tables[header][cells[0]] = cells[1:]
    return tables


def test_the_readme_quotes_the_rehearsals_figures_as_docs_gpu_gives_them():
    tables = rehearsal_tables()
    steps, artifacts, limits = tables["step"], tables["artifact"], tables["Kaggle's limit"]
    readme = " ".join((REPO / "README.md").read_text().split())  # quotes may wrap
    peak = max((cells[1] for cells in steps.values() if cells[1] != "—"), key=lambda v: float(v.split()[0]))
    quotes = {
        "peak memory": f"peak memory {peak}",
        "crops a study": f"crops {artifacts['crops, cut at the true vertebrae'][1]} a study",
        "cache a study": f"cache {artifacts['slice cache'][1]} a study",
        "the training set's disk": f"{limits['working disk'][1]} for the training set",
        "prepare's peak": f"8 reading processes {steps['prepare'][1]}",
    }
    missing = {name: quote for name, quote in quotes.items() if quote not in readme}
    assert not missing, f"the README does not quote docs/gpu.md's rehearsal: {missing}"
    minutes = re.search(r"rehearsal of `rsna` took \*\*([\d.]+) min", (REPO / "docs" / "gpu.md").read_text())
    assert minutes and f"{minutes.group(1)} min" in readme


def test_the_figures_the_rehearsal_replaced_are_quoted_nowhere():
    """The crop store's 84 GB and the disk's 147 GB were arithmetic before the rehearsal measured them."""
    texts = [REPO / "README.md", REPO / "benchmarks" / "README.md", *(REPO / "notebooks").glob("*.ipynb")]
    texts += (REPO / "src" / "cspine").rglob("*.yaml")  # docs/gpu.md names them once, as what was replaced
    for path in texts:
        text = path.read_text()
        for stale in ("84 GB", "147 GB", "41 MB each"):
            assert stale not in text, f"{path.relative_to(REPO)} still quotes {stale}"


def kaggle_budget() -> dict[str, tuple[str, str]]:
    """docs/gpu.md's Kaggle budget: {config: (two T4s, one T4)}, the hours as written."""
    text = (REPO / "docs" / "gpu.md").read_text()
    start, end = "<!-- kaggle budget: start -->", "<!-- kaggle budget: end -->"
    assert start in text and end in text, "docs/gpu.md lost its Kaggle budget block"
    rows = [line.strip("|").split("|") for line in text[text.index(start) : text.index(end)].splitlines()]
    return {
        row[0].split("`")[1]: (row[1].strip().removesuffix(" h"), row[2].strip().removesuffix(" h"))
        for row in rows[3:]
        if len(row) > 2
    }


def test_every_kaggle_time_quoted_is_a_row_of_docs_gpu_budget():
    """Notebook 05 said the paper config takes 0.7–1.3 h on Kaggle, benchmarks/README.md 3.6–7.2 h, and the
    two-T4 figure of docs/gpu.md assumed `predict` spread every model over the GPUs (it spreads the CNNs
    only). Every range of hours in prose (a table's cells are its parts) must be one of the budget's rows."""
    budget = kaggle_budget()
    assert set(budget) == {"rsna", "paper"}
    allowed = {f"{two}–{one} h" for two, one in budget.values()}
    texts = [REPO / "README.md", REPO / "benchmarks" / "README.md", *(REPO / "docs").glob("*.md")]
    texts += (REPO / "notebooks").glob("*.ipynb")
    stale = []
    for path in texts:
        for line in path.read_text().splitlines():
            if line.lstrip(' "').startswith("|"):
                continue
            stale += [
                f"{path.relative_to(REPO)}: {m}"
                for m in re.findall(r"\d+(?:\.\d+)?–\d+(?:\.\d+)? h\b", line)
                if m not in allowed
            ]
    assert not stale, f"Kaggle times that are not docs/gpu.md's budget: {stale}"
    readme = " ".join((REPO / "README.md").read_text().split())
    assert f"{'–'.join(budget['rsna'])} h of the 9 hours" in readme


def test_the_readme_quotes_the_held_out_table_as_docs_experiments_gives_it():
    """The README's "How good it is" is docs/experiments.md's held-out table, row for row, and that table is
    the first in docs/experiments.md (where things stand now), before the dated history."""
    text = (REPO / "docs" / "experiments.md").read_text()
    start, end = "<!-- held out: start -->", "<!-- held out: end -->"
    assert start in text and end in text, "docs/experiments.md lost its held-out block"
    first_table = next(i for i, line in enumerate(text.splitlines()) if line.startswith("|"))
    assert text.splitlines()[first_table - 1] == start
    assert text.index(end) < text.index("## History, newest first")
    rows = [line for line in text[text.index(start) : text.index(end)].splitlines() if line.startswith("|")]
    readme = (REPO / "README.md").read_text()
    assert len(rows) == 6
    missing = [row for row in rows if row not in readme]
    assert not missing, f"the README does not quote docs/experiments.md's held-out rows: {missing}"
