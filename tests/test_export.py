"""The exporter: the package matches the notebooks, and bad notebooks get clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmcourse import export

ROOT = Path(__file__).resolve().parents[1]


def test_package_matches_notebooks():
    """CI fails when a notebook changed and `python -m llmcourse.export` was not run (or a module was hand-edited)."""
    result = subprocess.run(
        [sys.executable, "-m", "llmcourse.export", "--check"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ---- a scratch repository with notebooks we write ourselves ---------------------------------------


def make_notebook(path: Path, cells: list[tuple[str, str]]) -> Path:
    """Write a minimal notebook: cells are (cell_type, source) pairs."""
    nb = {
        "cells": [
            {"cell_type": kind, "metadata": {}, "source": src}
            | ({"execution_count": None, "outputs": []} if kind == "code" else {})
            for kind, src in cells
        ],
        "metadata": {},
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(nb), encoding="utf-8")
    return path


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    (tmp_path / "llmcourse").mkdir()
    (tmp_path / "llmcourse" / "export.py").write_text("# Hand-written\n")
    (tmp_path / "_config.yml").write_text("repository:\n  url: https://github.com/someone/course\n  branch: main\n")
    return tmp_path


TITLE = ("markdown", "# Day 1 · Things\n\nA promise in two sentences. It reads well.")


def test_export_writes_module_with_header_all_and_relative_imports(repo):
    make_notebook(
        repo / "notebooks/day01_things.ipynb",
        [
            TITLE,
            ("code", "#| default_exp things"),
            ("code", "#| export\nfrom llmcourse.core import set_seed\nimport math\n\nLIMIT = 3\n\ndef area(r: float) -> float:\n    return math.pi * r * r"),
            ("code", "area(2)  # not exported"),
            ("code", "#| exporti\ndef _helper():\n    return 1\n\ndef internal_but_public_name():\n    return 2"),
            ("code", "#| export\nclass Circle:\n    pass"),
        ],
    )
    assert export.export(repo) == ["things"]
    text = (repo / "llmcourse/things.py").read_text()
    assert text.startswith(export.GENERATED_MARK + " from notebooks/day01_things.ipynb.")
    assert '"""Day 1 · Things.\n\nA promise in two sentences. It reads well.\n"""' in text
    assert "__all__ = ['LIMIT', 'area', 'Circle']" in text
    assert "from .core import set_seed" in text and "from llmcourse" not in text
    assert "area(2)" not in text and "def _helper" in text
    compile(text, "things.py", "exec")
    assert export.check(repo) == []


def test_check_names_drifted_missing_and_stale_modules(repo):
    nb = make_notebook(repo / "notebooks/day01_things.ipynb", [TITLE, ("code", "#| default_exp things"), ("code", "#| export\nX = 1")])
    export.export(repo)
    (repo / "llmcourse/things.py").write_text((repo / "llmcourse/things.py").read_text() + "# hand edit\n")
    assert export.check(repo) == ["llmcourse/things.py differs from notebooks/day01_things.ipynb"]
    (repo / "llmcourse/things.py").unlink()
    assert "llmcourse/things.py is missing" in export.check(repo)[0]
    export.export(repo)
    make_notebook(nb, [TITLE, ("code", "#| default_exp other"), ("code", "#| export\nX = 1")])
    assert export.check(repo) == [
        "llmcourse/other.py is missing (exported by notebooks/day01_things.ipynb)",
        "llmcourse/things.py is generated but no notebook exports it any more",
    ]
    export.export(repo)  # regenerating from scratch removes the stale module, keeps hand-written ones
    assert not (repo / "llmcourse/things.py").exists() and (repo / "llmcourse/export.py").exists()
    assert export.check(repo) == []


def test_cli_check_exit_codes(repo):
    make_notebook(repo / "notebooks/day01_things.ipynb", [TITLE, ("code", "#| default_exp things"), ("code", "#| export\nX = 1")])
    assert export.main(["--root", str(repo), "--check"]) == 1
    assert export.main(["--root", str(repo)]) == 0
    assert export.main(["--root", str(repo), "--check"]) == 0


def test_export_without_default_exp_names_notebook_and_cell(repo):
    make_notebook(repo / "notebooks/day01_things.ipynb", [TITLE, ("code", "x = 1"), ("code", "#| export\nX = 1")])
    with pytest.raises(export.ExportError, match=r"day01_things.ipynb, cell 2: `#\| export` but .*no `#\| default_exp`"):
        export.export(repo)


def test_two_notebooks_claiming_one_module(repo):
    make_notebook(repo / "notebooks/day01_a.ipynb", [TITLE, ("code", "#| default_exp shared")])
    make_notebook(repo / "notebooks/day02_b.ipynb", [TITLE, ("code", "#| default_exp shared")])
    with pytest.raises(export.ExportError, match=r"day02_b.ipynb, cell 1: module `shared` is already exported by notebooks/day01_a.ipynb"):
        export.export(repo)


def test_invalid_python_in_exported_cell(repo):
    make_notebook(repo / "notebooks/day01_things.ipynb", [TITLE, ("code", "#| default_exp things"), ("code", "#| export\ndef broken(:\n    pass")])
    with pytest.raises(export.ExportError, match=r"day01_things.ipynb, cell 2: exported code is not valid Python \(line 1"):
        export.export(repo)


def test_magics_in_exported_cell_are_rejected(repo):
    make_notebook(repo / "notebooks/day01_things.ipynb", [TITLE, ("code", "#| default_exp things"), ("code", "#| export\n%timeit 1 + 1")])
    with pytest.raises(export.ExportError, match="not valid Python"):
        export.export(repo)


def test_bad_and_reserved_module_names(repo):
    make_notebook(repo / "notebooks/day01_things.ipynb", [TITLE, ("code", "#| default_exp Bad-Name")])
    with pytest.raises(export.ExportError, match="not a valid module name"):
        export.export(repo)
    make_notebook(repo / "notebooks/day01_things.ipynb", [TITLE, ("code", "#| default_exp export")])
    with pytest.raises(export.ExportError, match="hand-written module"):
        export.export(repo)


def test_second_module_from_one_notebook(repo):
    make_notebook(
        repo / "notebooks/day07_text.ipynb",
        [TITLE, ("code", "#| default_exp data"), ("code", "#| export\nA = 1"), ("code", "#| export chartok\nB = 2")],
    )
    assert export.export(repo) == ["chartok", "data"]
    assert "B = 2" in (repo / "llmcourse/chartok.py").read_text()
    assert "B = 2" not in (repo / "llmcourse/data.py").read_text()


def test_modules_follow_day_order(repo):
    make_notebook(repo / "notebooks/day10_b.ipynb", [TITLE, ("code", "#| default_exp b")])
    make_notebook(repo / "notebooks/day02_a.ipynb", [TITLE, ("code", "#| default_exp a")])
    assert [p.name for p in export.notebook_paths(repo)] == ["day02_a.ipynb", "day10_b.ipynb"]


def test_stamp_inserts_setup_cell_and_badge_once(repo):
    nb_path = make_notebook(repo / "notebooks/day01_things.ipynb", [TITLE, ("code", "#| default_exp things")])
    assert export.stamp(repo) == [nb_path]
    assert export.stamp(repo) == []  # idempotent
    nb = json.loads(nb_path.read_text())
    title = "".join(nb["cells"][0]["source"])
    assert title.count(export.BADGE_MARK) == 1
    assert "colab.research.google.com/github/someone/course/blob/main/notebooks/day01_things.ipynb" in title
    setup = "".join(nb["cells"][1]["source"])
    assert setup == export.setup_cell_source(repo)
    assert nb["cells"][1]["metadata"]["tags"] == ["hide-input"]
    assert '"google.colab" in sys.modules' in setup and "git+https://github.com/someone/course@main" in setup
    compile(setup, "setup", "exec")
    assert "".join(nb["cells"][2]["source"]) == "#| default_exp things"


def test_stamp_follows_the_repository_in_config(repo):
    nb_path = make_notebook(repo / "notebooks/day01_things.ipynb", [TITLE])
    export.stamp(repo)
    (repo / "_config.yml").write_text("repository:\n  url: https://github.com/elsewhere/fork\n  branch: dev\n")
    export.stamp(repo)
    text = nb_path.read_text()
    assert "someone/course" not in text and "elsewhere/fork@dev" in text and "blob/dev/notebooks" in text


def test_stamp_requires_a_title_cell(repo):
    make_notebook(repo / "notebooks/day01_things.ipynb", [("code", "x = 1")])
    with pytest.raises(export.ExportError, match="title cell"):
        export.stamp(repo)


def test_run_executes_in_place_and_exports(repo):
    nb_path = make_notebook(
        repo / "notebooks/day01_things.ipynb",
        [TITLE, ("code", "#| default_exp things"), ("code", "#| export\nVALUE = 6 * 7"), ("code", "print(VALUE)")],
    )
    export.stamp(repo)
    # The stamped setup cell imports torch, matplotlib and llmcourse; all are installed in this environment.
    export.run_notebook(nb_path)
    nb = json.loads(nb_path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert [c["execution_count"] for c in code] == [1, 2, 3, 4]
    assert "".join(code[-1]["outputs"][0]["text"]) == "42\n"


def test_run_leaves_a_failing_notebook_untouched(repo):
    nb_path = make_notebook(repo / "notebooks/day01_things.ipynb", [TITLE, ("code", "x = 1"), ("code", "raise ValueError('boom')")])
    before = nb_path.read_text()
    with pytest.raises(export.ExportError, match=r"day01_things.ipynb, cell 2 failed"):
        export.run_notebook(nb_path)
    assert nb_path.read_text() == before


# ---- directives the exporter would otherwise drop without a word ----------------------------------


def test_unknown_directive_names_notebook_cell_and_the_known_ones(repo):
    make_notebook(repo / "notebooks/day01_things.ipynb", [TITLE, ("code", "#| default_exp things"), ("code", "#| exprot\nX = 1")])
    with pytest.raises(
        export.ExportError, match=r"day01_things.ipynb, cell 2: unknown directive `#\| exprot` \(.*default_exp, export, exporti\)"
    ):
        export.export(repo)


def test_bare_directive_mark_is_unknown(repo):
    make_notebook(repo / "notebooks/day01_things.ipynb", [TITLE, ("code", "#| default_exp things"), ("code", "#|\nX = 1")])
    with pytest.raises(export.ExportError, match=r"cell 2: unknown directive"):
        export.export(repo)


@pytest.mark.parametrize(
    "source, line",
    [
        ("# NBVAL_IGNORE_OUTPUT\n#| export\nX = 1", 2),  # the cell used to vanish from the package
        ("#| export\nX = 1\n#| exporti\nY = 2", 3),
        ("X = 1\n\ndef f():\n    #| export\n    return X", 4),
    ],
    ids=["below-a-comment", "below-code", "indented"],
)
def test_directive_below_comment_or_code_is_refused(repo, source, line):
    make_notebook(repo / "notebooks/day01_things.ipynb", [TITLE, ("code", "#| default_exp things"), ("code", source)])
    with pytest.raises(export.ExportError, match=rf"day01_things.ipynb, cell 2: directive `#\| exporti?` on line {line} .*must come first"):
        export.export(repo)


def test_directive_text_inside_a_string_is_not_a_directive(repo):
    make_notebook(
        repo / "notebooks/day01_things.ipynb",
        [TITLE, ("code", "#| default_exp things"), ("code", '#| export\nHELP = """\n#| export marks a cell\n"""')],
    )
    assert export.export(repo) == ["things"]
    assert "#| export marks a cell" in (repo / "llmcourse/things.py").read_text()


def test_blank_lines_among_leading_directives_are_fine(repo):
    make_notebook(repo / "notebooks/day01_things.ipynb", [TITLE, ("code", "\n#| default_exp things\n\n"), ("code", "#| export\n\nX = 1")])
    assert export.export(repo) == ["things"]


@pytest.mark.parametrize("source", ["#| exprot\nX = 1", "# NBVAL_IGNORE_OUTPUT\n#| export\nX = 1"], ids=["unknown", "misplaced"])
def test_cli_fails_on_bad_directives(repo, capsys, source):
    make_notebook(repo / "notebooks/day01_things.ipynb", [TITLE, ("code", "#| default_exp things"), ("code", source)])
    for argv in (["--check"], []):
        assert export.main([*argv, "--root", str(repo)]) != 0
        err = capsys.readouterr().err
        assert err.startswith("error: notebooks/day01_things.ipynb, cell 2:"), err
    assert not (repo / "llmcourse/things.py").exists()  # nothing half-exported
    result = subprocess.run(
        [sys.executable, "-m", "llmcourse.export", "--check", "--root", str(repo)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0 and "day01_things.ipynb, cell 2" in result.stderr


# ---- the environment notebooks run in ---------------------------------------------------------------


def test_notebook_environment_finds_shared_data_and_keeps_what_is_set(tmp_path):
    root = tmp_path / "course"
    root.mkdir()
    assert "LLMCOURSE_DATA_DIR" not in export.notebook_environment(root, environ={})  # no shared/data yet
    (tmp_path / "shared" / "data").mkdir(parents=True)
    env = export.notebook_environment(root, environ={})
    assert env == {
        "LLMCOURSE_DATA_DIR": str(tmp_path.resolve() / "shared" / "data"),
        "OMP_WAIT_POLICY": "PASSIVE",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    kept = export.notebook_environment(root, environ={"LLMCOURSE_DATA_DIR": "/mine", "OMP_WAIT_POLICY": ""})
    assert "LLMCOURSE_DATA_DIR" not in kept and "OMP_WAIT_POLICY" not in kept and kept["HF_HUB_OFFLINE"] == "1"


def test_conftest_uses_the_notebook_environment():
    for name, value in export.notebook_environment(ROOT, environ={}).items():
        assert name in os.environ, f"conftest.py should set {name} (to {value!r} unless already set)"


def test_run_notebook_starts_the_kernel_with_the_notebook_environment(tmp_path, monkeypatch):
    root = tmp_path / "course"
    (tmp_path / "shared" / "data").mkdir(parents=True)
    monkeypatch.delenv("LLMCOURSE_DATA_DIR", raising=False)
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "kept")  # already set: passed on as it is
    nb_path = make_notebook(
        root / "notebooks/day01_things.ipynb",
        [TITLE, ("code", 'import os\nprint(os.environ.get("LLMCOURSE_DATA_DIR"), os.environ.get("TRANSFORMERS_OFFLINE"))')],
    )
    export.run_notebook(nb_path)
    assert "LLMCOURSE_DATA_DIR" not in os.environ  # the test process itself is left alone
    cell = json.loads(nb_path.read_text())["cells"][1]
    assert "".join(cell["outputs"][0]["text"]) == f"{tmp_path.resolve() / 'shared' / 'data'} kept\n"


# ---- the default_exp cell stays in the notebook but not on the book's page -------------------------


def test_stamp_tags_the_default_exp_cell_remove_cell(repo):
    nb_path = make_notebook(
        repo / "notebooks/day01_things.ipynb",
        [TITLE, ("code", "#| default_exp things\n"), ("code", "#| export\nX = 1"), ("code", "#| default_exp more\nY = 2")],
    )
    nb = json.loads(nb_path.read_text())
    nb["cells"][1]["metadata"]["tags"] = ["keep-me"]
    nb_path.write_text(json.dumps(nb))
    assert export.stamp(repo) == [nb_path]
    assert export.stamp(repo) == []  # idempotent: the tag is not added twice
    cells = json.loads(nb_path.read_text())["cells"]  # cell 1 is now the setup cell
    assert "".join(cells[2]["source"]) == "#| default_exp things\n"
    assert cells[2]["metadata"]["tags"] == ["keep-me", export.REMOVE_CELL_TAG]
    assert "tags" not in cells[3]["metadata"]  # exported code stays on the page
    assert "tags" not in cells[4]["metadata"]  # more than the directive: the reader should see the code
    assert cells[1]["metadata"]["tags"] == ["hide-input"]
