"""The house stays as documented in ``docs/architecture.md``: data flow one way.

Asserts, from the source alone (nothing is imported):

* no module imports a layer above its own (the order is :data:`LAYERS`), and packages on the
  same floor do not import each other;
* the module-level import graph of ``src/segcal`` has no cycle;
* no private name (``_x``) is imported from another module, and no private module is imported
  from outside its own package;
* imports of segcal modules sit at module level, except in the few places listed in
  :data:`LAZY_IMPORTS`, each with its reason.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "segcal"

#: floors from the ground up; a module may import its own package and any package on a lower
#: floor. Several packages on one floor stand beside each other and do not import each other.
LAYERS: list[tuple[str, ...]] = [
    ("segcal.errors", "segcal.version"),
    ("segcal.validation", "segcal.data"),
    ("segcal.io",),
    ("segcal.datasets", "segcal.shift"),
    ("segcal.metrics",),
    ("segcal.losses",),
    ("segcal.calibrators",),
    ("segcal.estimation", "segcal.conformal"),
    ("segcal.models",),
    ("segcal.pipeline",),
    ("segcal.adaptation",),
    ("segcal.bench",),
    ("segcal.report",),
    ("segcal.cli",),
    ("segcal.integrations",),
    ("segcal", "segcal.__main__", "segcal.plot"),  # the package face (re-exports only) and `python -m segcal`
]

#: (module, function) pairs allowed to import segcal modules inside a function, and why
LAZY_IMPORTS: dict[tuple[str, str], str] = {
    # `import segcal` stays light (`segcal --version` must not import torch); `segcal.load`
    # imports the calibrators on first use (PEP 562). The command line imports a command's module
    # only once that command is chosen, through importlib in `segcal.cli.app.run_command`.
    ("segcal", "__getattr__"): "start-up time",
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


MODULES = _modules()


def _is_package(mod: str) -> bool:
    return MODULES[mod].name == "__init__.py"


def _resolve(mod: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = mod.split(".") if _is_package(mod) else mod.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _imports(mod: str) -> list[tuple[str, list[str], str | None, int]]:
    """(target module, imported names, enclosing function or None, line) for each segcal import."""
    tree = ast.parse(MODULES[mod].read_text(), filename=str(MODULES[mod]))
    out: list[tuple[str, list[str], str | None, int]] = []

    def visit(node: ast.AST, func: str | None, in_type_checking: bool) -> None:
        for child in ast.iter_child_nodes(node):
            f = func
            tc = in_type_checking
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                f = child.name if func is None else func
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                tc = True
            if isinstance(child, ast.Import):
                for a in child.names:
                    if a.name == "segcal" or a.name.startswith("segcal."):
                        out.append((a.name, [], f if not tc else "<typing>", child.lineno))
            elif isinstance(child, ast.ImportFrom):
                target = _resolve(mod, child)
                if target == "segcal" or target.startswith("segcal."):
                    names = [a.name for a in child.names]
                    # `from segcal.pkg import submodule` imports the submodule
                    subs = [n for n in names if f"{target}.{n}" in MODULES]
                    for s in subs:
                        out.append((f"{target}.{s}", [], f if not tc else "<typing>", child.lineno))
                    rest = [n for n in names if n not in subs]
                    if rest or not subs:
                        out.append((target, rest, f if not tc else "<typing>", child.lineno))
            visit(child, f, tc)

    visit(tree, None, False)
    return out


def _floor(mod: str) -> tuple[int, str]:
    best: tuple[int, str] | None = None
    for i, group in enumerate(LAYERS):
        for pkg in group:
            if (mod == pkg or mod.startswith(pkg + ".")) and (best is None or len(pkg) > len(best[1])):
                best = (i, pkg)
    assert best is not None, f"{mod} is on no floor of LAYERS: add it to tests/test_layers.py"
    return best


def test_every_module_is_on_a_floor() -> None:
    for mod in MODULES:
        _floor(mod)


def test_no_upward_or_sideways_import() -> None:
    bad = []
    for mod in MODULES:
        fl, pkg = _floor(mod)
        for target, _names, _func, line in _imports(mod):
            tf, tpkg = _floor(target)
            if tpkg == pkg:
                continue
            if tf >= fl:
                bad.append(f"{mod}:{line} imports {target} ({tpkg}, floor {tf} >= {fl})")
    assert not bad, "imports that run up or sideways:\n" + "\n".join(bad)


def test_no_private_name_crosses_a_module() -> None:
    bad = []
    for mod in MODULES:
        _fl, pkg = _floor(mod)
        for target, names, _func, line in _imports(mod):
            if target == mod:
                continue
            for n in names:
                if n.startswith("_") and not n.startswith("__"):
                    bad.append(f"{mod}:{line} imports private {n} from {target}")
            private_parts = [p for p in target.split(".")[1:] if p.startswith("_") and p != "__main__"]
            if private_parts and _floor(target)[1] != pkg:
                bad.append(f"{mod}:{line} imports the private module {target} from outside its package")
    assert not bad, "\n".join(bad)


def test_segcal_imports_sit_at_module_level() -> None:
    bad = []
    for mod in MODULES:
        for target, _names, func, line in _imports(mod):
            if func in (None, "<typing>"):
                continue
            if (mod, func) in LAZY_IMPORTS:
                continue
            bad.append(f"{mod}:{line} imports {target} inside {func}()")
    assert not bad, (
        "imports inside functions hide the real graph (move them to module level, or list the "
        "place in LAZY_IMPORTS with its reason):\n" + "\n".join(bad)
    )


def test_module_level_import_graph_has_no_cycle() -> None:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for mod in MODULES:
        for target, _names, func, _line in _imports(mod):
            if func is None and target in MODULES and target != mod:
                graph[mod].add(target)
    # a package's face importing its own submodules is how packages work; a submodule importing
    # its own package's face while the face imports it back is a cycle and is reported
    WHITE, GREY, BLACK = 0, 1, 2
    colour = dict.fromkeys(graph, WHITE)
    stack: list[str] = []
    cycles: list[list[str]] = []

    def dfs(u: str) -> None:
        colour[u] = GREY
        stack.append(u)
        for v in sorted(graph[u]):
            if colour[v] == GREY:
                cycles.append([*stack[stack.index(v):], v])
            elif colour[v] == WHITE:
                dfs(v)
        stack.pop()
        colour[u] = BLACK

    for m in sorted(graph):
        if colour[m] == WHITE:
            dfs(m)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("limit", [550])
def test_no_module_is_too_long(limit: int) -> None:
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) >= limit}
    assert not long, f"modules of {limit}+ lines: {long}"


def test_the_checker_sees_the_imports() -> None:
    """The checks above are not vacuous: the reader finds module-level imports, relative or
    absolute, and tells a function-level import from a module-level one."""
    edges = {(m, t) for m in MODULES for t, _n, f, _l in _imports(m) if f is None}
    assert len(edges) > 150
    assert ("segcal.metrics.engine", "segcal.metrics.state") in edges
    assert ("segcal.cli.app", "segcal.errors") in edges
    lazy = [(t, f) for t, _n, f, _l in _imports("segcal")]
    assert ("segcal.calibrators", "__getattr__") in lazy
    assert _floor("segcal.bench.protocol") > _floor("segcal.pipeline.evaluate")
    assert _floor("segcal.io.files")[0] < _floor("segcal.metrics.engine")[0]
