"""Hygiene of the day notebooks: listed in the book, stamped, executed in order, small and error-free."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from llmcourse import export

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = export.notebook_paths(ROOT)
MAX_OUTPUT_BYTES = 200_000


def toc_files() -> list[str]:
    return re.findall(r"^\s*-?\s*(?:file|root):\s*(\S+)", (ROOT / "_toc.yml").read_text(encoding="utf-8"), re.MULTILINE)


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def code_cells(nb: dict) -> list[dict]:
    return [c for c in nb["cells"] if c["cell_type"] == "code"]


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 6


def test_every_toc_entry_exists():
    for entry in toc_files():
        candidates = [ROOT / f"{entry}{suffix}" for suffix in (".md", ".ipynb", "")]
        assert any(p.is_file() for p in candidates), f"_toc.yml lists {entry}, which does not exist"


def test_every_notebook_is_in_the_toc():
    listed = set(toc_files())
    missing = [p.name for p in NOTEBOOKS if f"notebooks/{p.stem}" not in listed]
    assert not missing, f"not listed in _toc.yml: {missing}"


def test_notebook_names_follow_day_order():
    days = [int(re.match(r"day(\d\d)_[a-z0-9_]+$", p.stem).group(1)) for p in NOTEBOOKS]
    assert days == sorted(set(days)), "one notebook a day, named dayNN_slug.ipynb"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_title_cell(path):
    nb = load(path)
    first = nb["cells"][0]
    day = int(path.stem[3:5])
    assert first["cell_type"] == "markdown"
    source = "".join(first["source"])
    assert re.match(rf"# Day {day} · \S", source), f"{path.name}: the first cell must start '# Day {day} · Title'"
    assert export.badge_line(ROOT, path) in source, f"{path.name}: Colab badge missing or stale: run --stamp"
    headings = [ln for c in nb["cells"] if c["cell_type"] == "markdown" for ln in "".join(c["source"]).splitlines() if ln.startswith("# ")]
    assert len(headings) == 1, f"{path.name}: only the title is a level-1 heading, found {headings}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_setup_cell_is_the_stamped_one(path):
    second = load(path)["cells"][1]
    assert second["cell_type"] == "code"
    assert "".join(second["source"]) == export.setup_cell_source(ROOT), f"{path.name}: run `python -m llmcourse.export --stamp`"
    assert second["metadata"].get("tags") == ["hide-input"], f"{path.name}: run `python -m llmcourse.export --stamp`"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_default_exp_cell_is_left_out_of_the_book(path):
    """The `#| default_exp` cell stays in the notebook, but Jupyter Book removes a `remove-cell` cell from the page."""
    cells = [c for c in code_cells(load(path)) if export.is_default_exp_cell(c)]
    for cell in cells:
        tags = cell.get("metadata", {}).get("tags", [])
        assert export.REMOVE_CELL_TAG in tags, (
            f"{path.name}: the `#| default_exp` cell needs the `{export.REMOVE_CELL_TAG}` tag: run `python -m llmcourse.export --stamp`"
        )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_executed_top_to_bottom_without_errors(path):
    cells = code_cells(load(path))
    counts = [c["execution_count"] for c in cells]
    assert counts == list(range(1, len(cells) + 1)), f"{path.name}: execution counts {counts}; run it with --run"
    for index, cell in enumerate(cells, start=1):
        for output in cell["outputs"]:
            assert output["output_type"] != "error", f"{path.name}: code cell {index} has an error output"
            size = len(json.dumps(output))
            assert size <= MAX_OUTPUT_BYTES, f"{path.name}: code cell {index} has an output of {size} bytes"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_exports_name_a_module(path):
    sources = ["".join(c["source"]) for c in code_cells(load(path))]
    directives = [d for src in sources for d, _ in export.split_directives(src)[0]]
    if {"export", "exporti"} & set(directives):
        assert "default_exp" in directives, f"{path.name}: exports cells but has no #| default_exp"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_ignored_outputs_are_followed_by_a_check(path):
    """A cell whose output nbval ignores must be followed by a cell that asserts something."""
    sources = ["".join(c["source"]) for c in code_cells(load(path))]
    for i, src in enumerate(sources):
        if src.lstrip().startswith("# NBVAL_IGNORE_OUTPUT"):
            later = "\n".join(sources[i : i + 3])
            assert "assert" in later, f"{path.name}: code cell {i + 1} ignores its output and nothing after it checks"
        assert "NBVAL_SKIP" not in src, f"{path.name}: code cell {i + 1} is skipped; fix it instead"
        assert "NBVAL_RAISES_EXCEPTION" not in src, f"{path.name}: catch and print the error instead"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_shape_of_a_day(path):
    """Title cell says what the day needs; the lesson ends with exercises and a recap (CONVENTIONS.md)."""
    cells = load(path)["cells"]
    assert "**Needs:**" in "".join(cells[0]["source"]), f"{path.name}: the title cell names what it needs from earlier days"
    markdown = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    for heading in ("## Try it", "## Recap"):
        assert re.search(rf"^{heading}\s*$", markdown, re.MULTILINE), f"{path.name}: no `{heading}` section"
    plots = [c for c in code_cells({"cells": cells}) if "plt." in "".join(c["source"])]
    for cell in plots:
        src = "".join(cell["source"])
        if any(k in src for k in ("plt.plot", "plt.imshow", "plt.subplots", "plt.bar", "plt.figure")):
            assert src.rstrip().endswith("plt.show()"), f"{path.name}: a plotting cell must end with plt.show()"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_day_has_a_worked_solution(path):
    """At least one exercise is solved in a folded, executed cell that checks its answer (CONVENTIONS.md)."""
    solutions = [c for c in code_cells(load(path)) if {"solution", "hide-cell"} <= set(c.get("metadata", {}).get("tags", []))]
    assert solutions, f"{path.name}: no code cell tagged solution and hide-cell"
    for cell in solutions:
        assert "assert" in "".join(cell["source"]), f"{path.name}: a worked solution must end in an assert that checks it"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_headings_carry_no_math(path):
    """The book's side contents show math in a heading as raw LaTeX."""
    for cell in load(path)["cells"]:
        if cell["cell_type"] != "markdown":
            continue
        for line in "".join(cell["source"]).splitlines():
            if line.startswith("#"):
                assert "$" not in line and "\\(" not in line, f"{path.name}: math in the heading {line!r}"


TRACEBACK_SIGNS = ("Traceback (most recent call last)", "NameResolutionError", "Max retries exceeded", "Temporary failure in name resolution")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_no_page_shows_a_traceback_or_a_network_error(path):
    """Deliberate errors are printed as one line by an except block; nothing else of an error reaches the page."""
    for index, cell in enumerate(code_cells(load(path)), start=1):
        for output in cell["outputs"]:
            text = "".join(output.get("text", "")) + json.dumps(output.get("data", {}).get("text/plain", ""))
            for sign in TRACEBACK_SIGNS:
                assert sign not in text, f"{path.name}: code cell {index} shows {sign!r}"
