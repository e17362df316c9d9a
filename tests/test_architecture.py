"""The house's layering: every import points down, no cycle, and the recording core never loads the task.

autoclip <- dynamics (core) <- dynamics.integrations, dynamics.tasks <- figures <- cli
"""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("autoclip", "dynamics", "figures", "cli")
# layer of each part; an import may only go to a lower or equal layer (equal: inside the same part)
LAYERS = {"autoclip": 0, "dynamics": 1, "dynamics.integrations": 2, "dynamics.tasks": 2, "figures": 3, "cli": 4}


def _part(module: str) -> str:
    for prefix in ("dynamics.integrations", "dynamics.tasks"):
        if module == prefix or module.startswith(prefix + "."):
            return prefix
    return module.split(".")[0]


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules imported anywhere in the file (lazy imports inside functions included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def test_every_import_points_down_the_layers():
    modules = _modules()
    upward = []
    for module, path in modules.items():
        for target in _imports(path, modules):
            if LAYERS[_part(target)] > LAYERS[_part(module)]:
                upward.append(f"{module} imports {target}")
            elif LAYERS[_part(target)] == LAYERS[_part(module)] and _part(target) != _part(module):
                upward.append(f"{module} imports its sibling {target}")
    assert upward == []


def test_the_packages_import_graph_has_no_cycle():
    modules = _modules()
    graph = {m: {t for t in _imports(p, modules) if t != m} for m, p in modules.items()}
    # package __init__ files re-export their modules; a cycle through them is a real cycle too,
    # so drop only the edges from a package to its own submodules (lazy re-exports)
    graph = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in graph.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node, stack):
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_recording_and_figures_never_load_the_task():
    code = (
        "import sys; import dynamics, dynamics.recorder, dynamics.quantities, dynamics.run, dynamics.summary;"
        "import figures, figures.fig1, figures.animation, figures.compare;"
        "from dynamics import Recorder, load_run;"
        "print(sorted(m for m in sys.modules if m.startswith('dynamics.tasks')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


FOREIGN = ("SP" + "EC", "shared/" + "reference")  # spelled apart so this file does not match itself


def test_the_repository_stands_alone():
    """No file refers to documents a reader of the repository does not have."""
    offenders = []
    for path in ROOT.rglob("*"):
        if path.suffix not in (".py", ".md", ".toml", ".txt", ".cfg") and path.name not in ("Makefile", "run"):
            continue
        if any(part.startswith(".") or part in ("runs", "build") for part in path.relative_to(ROOT).parts[:-1]):
            continue
        text = path.read_text(errors="ignore").replace("SPECS", "")
        if any(word in text for word in FOREIGN):
            offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []
