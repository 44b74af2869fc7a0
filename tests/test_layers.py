"""The package's architecture, read from its imports: parts in layers, arrows pointing down, no circles.

The layers are written once, here (docs/architecture.md draws them). A module may import its own
part and any part of a lower layer; never a part beside it or above it. Every import counts, the
ones inside functions too.
"""

from __future__ import annotations

import ast
import re
from importlib import import_module
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "distill"

# top to bottom; parts on one line are side by side and do not import each other
LAYERS = (
    ("distill.cli",),
    ("distill.pipeline",),
    ("distill.stages",),
    ("distill.train", "distill.export"),
    ("distill.teacher", "distill.student"),
    ("distill.evaluate",),
    ("distill.losses",),
    ("distill.core",),
    ("distill",),  # the package root: __version__ and nothing else
)
MAX_LINES = 600
MAX_STAGE_LINES = 250


def module_name(path: Path) -> str:
    name = ".".join(path.relative_to(SRC).with_suffix("").parts)
    return name.removesuffix(".__init__")


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(path: Path, known: set[str]) -> set[str]:
    """The distill modules ``path`` imports, at any depth (``from distill.core import fsio`` is the
    module distill.core.fsio; ``from distill.core.fsio import write_text`` is too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("distill")}
        elif (
            isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("distill")
        ):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.add(sub if sub in known else node.module)
    return out


def part(module: str) -> str:
    """The part a module belongs to: its entry in LAYERS."""
    parts = [p for layer in LAYERS for p in layer if module == p or module.startswith(p + ".")]
    return max(parts, key=len)


def level(p: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if p in layer)


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imported(path, set(mods)) - {m} for m, path in mods.items()}


def test_every_module_belongs_to_a_layer():
    for m in modules():
        assert part(m) != "distill" or m == "distill", f"{m} is in no part: add its folder to LAYERS"


def test_no_import_goes_up_or_sideways():
    bad = []
    for m, deps in graph().items():
        mine = part(m)
        for d in deps:
            theirs = part(d)
            if theirs != mine and level(theirs) <= level(mine):
                bad.append(f"{m} -> {d} ({mine} may import only parts below it)")
    assert not bad, "\n".join(sorted(bad))


def test_no_import_circles():
    g = graph()
    state: dict[str, int] = {}
    circles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(g.get(m, ())):
            if state.get(d) == 1:
                circles.append(" -> ".join(path[path.index(d) :] + [d]))
            elif d not in state:
                visit(d, [*path, d])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    assert not circles, "\n".join(circles)


def test_the_checker_sees_a_circle_and_an_upward_import(tmp_path, monkeypatch):
    """The two checks above fail where they should: a copy of the package with one upward import."""
    copy = tmp_path / "src"
    pkg = copy / "distill"
    for p in PACKAGE.rglob("*.py"):
        dest = pkg / p.relative_to(PACKAGE)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(p.read_text())
    fsio = pkg / "core" / "fsio.py"
    fsio.write_text(
        fsio.read_text() + "\n\ndef _up():\n    from distill.stages.run_folder import load_split\n"
    )
    monkeypatch.setattr(__import__(__name__), "SRC", copy)
    monkeypatch.setattr(__import__(__name__), "PACKAGE", pkg)
    with pytest.raises(AssertionError, match=r"distill\.core\.fsio -> distill\.stages\.run_folder"):
        test_no_import_goes_up_or_sideways()
    with pytest.raises(AssertionError, match=r"distill\.core\.fsio"):
        test_no_import_circles()


def test_module_sizes():
    long = {m: n for m, p in modules().items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"
    stages = {m: n for m, p in modules().items() if m.startswith("distill.stages.")
              and (n := len(p.read_text().splitlines())) > MAX_STAGE_LINES}  # fmt: skip
    assert not stages, f"stage modules over {MAX_STAGE_LINES} lines: {stages}"


@pytest.mark.parametrize("package", sorted(m for m, p in modules().items() if p.name == "__init__.py"))
def test_each_part_says_what_it_is_and_its_public_names_exist(package):
    """Each __init__ has a one-line summary; the names it lists (``module: name, name``) are there."""
    mod = import_module(package)
    doc = mod.__doc__ or ""
    assert doc.strip() and len(doc.strip().splitlines()[0]) <= 110, f"{package}: no one-line summary"
    # "    module: name, name," with its continuation lines indented further
    listed = [
        (m, " ".join(names.split())) for m, names in re.findall(r"^ {4}(\w+): (.+(?:\n {8}.+)*)", doc, re.M)
    ]
    if package != "distill":
        assert listed, f"{package}: its docstring lists no public names"
    for module, names in listed:
        sub = import_module(f"{package}.{module}")
        for name in re.split(r",\s*", names.strip().rstrip(".")):
            assert hasattr(sub, name), f"{package}.{module} has no {name} (listed in {package}/__init__.py)"
    for name in getattr(mod, "__all__", ()):
        assert hasattr(mod, name), f"{package}.__all__ names {name}, which it does not define"
