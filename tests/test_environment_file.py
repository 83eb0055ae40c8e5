"""environment.yml: conda-forge alone (the pytorch channel stopped publishing with PyTorch 2.5), and the same extras as pip."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _section(lines: list[str], name: str) -> list[str]:
    """The '- item' lines under a top-level key of a simple YAML file."""
    start = lines.index(f"{name}:") + 1
    items = []
    for line in lines[start:]:
        if line and not line.startswith(" "):
            break
        if line.strip().startswith("- ") and line.startswith("  - "):
            items.append(line.strip()[2:].strip())
    return items


def test_conda_environment_uses_conda_forge_only():
    lines = [line.rstrip() for line in (ROOT / "environment.yml").read_text(encoding="utf-8").splitlines() if not line.lstrip().startswith("#")]
    assert _section(lines, "channels") == ["conda-forge"]
    dependencies = _section(lines, "dependencies")
    assert any(d.startswith("pytorch") for d in dependencies) and "pip" in dependencies
    assert '-e ".[dev,book,lab]"' in (ROOT / "environment.yml").read_text(encoding="utf-8")


def test_setup_page_says_how_to_get_a_cuda_build_with_conda():
    text = (ROOT / "book" / "setup.md").read_text(encoding="utf-8")
    assert "conda-forge" in text and "CONDA_CUDA_OVERRIDE" in text and "138506" in text
