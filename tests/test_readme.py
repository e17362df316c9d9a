"""The Python examples of the README and of every reference page in docs/ run as written."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CONTINUED = "# continued"  # a block that starts so runs after the block above it, as a reader would run it


def _examples() -> list[tuple[Path, str]]:
    out = []
    for page in PAGES:
        previous = ""
        for code in re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S):
            if code.startswith(CONTINUED):
                out.append((page, previous + code))
            else:
                out.append((page, code))
                previous = code
    return out


EXAMPLES = _examples()


def test_readme_has_examples():
    assert len([page for page, _ in EXAMPLES if page.name == "README.md"]) >= 3


@pytest.mark.parametrize("page,code", EXAMPLES, ids=[f"{page.stem}-{i}" for i, (page, _) in enumerate(EXAMPLES)])
def test_documented_example_runs(page, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    exec(compile(code, str(page), "exec"), {"__name__": "__docs__"})


def test_every_page_the_readme_links_exists():
    text = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(((?:docs/)[^)#]+)\)", text)
    assert links and [link for link in links if not (ROOT / link).exists()] == []
