"""Checks on the project itself: the README's test command is what CI runs."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_exactly_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    m = re.search(r"TEST_CMD='(.+)'", ci)
    assert m, ".ci/run must define TEST_CMD"
    readme = (ROOT / "README.md").read_text()
    assert m.group(1) in readme.splitlines(), "README.md must show the exact command .ci/run runs"


def test_constraints_pin_the_public_torch_version():
    """A local version label (``+cpu``) is not served by the public index: the first README
    command could not resolve on a machine without a local wheel folder (issue 16)."""
    pins = [ln.split("#")[0].strip() for ln in (ROOT / "constraints.txt").read_text().splitlines()]
    pins = [p for p in pins if p]
    assert "torch==2.13.0" in pins
    assert not any("+" in p for p in pins), pins


def test_readme_says_how_to_get_the_cpu_build():
    readme = (ROOT / "README.md").read_text()
    assert "--index-url https://download.pytorch.org/whl/cpu" in readme


def _optional_imports() -> dict[str, set[str]]:
    """Top-level module -> files of src/segcal that import it inside a function (optional deps)."""
    import ast

    found: dict[str, set[str]] = {}
    for path in (ROOT / "src" / "segcal").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(fn):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                for n in names:
                    found.setdefault(n.split(".")[0], set()).add(path.name)
    return found


def test_every_optional_dependency_has_an_extra():
    """Each third-party module imported inside a function of src/segcal (an optional dependency)
    is installed by an extra of pyproject.toml, and the install hint of the CLI knows that extra."""
    import tomllib

    from segcal.cli.app import EXTRAS

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = meta["optional-dependencies"]
    core = {"numpy", "torch", "tqdm", "PIL", "segcal"}
    dist = {"sklearn": "scikit-learn", "PIL": "pillow", "SimpleITK": "SimpleITK"}
    import sys

    stdlib = set(sys.stdlib_module_names)
    optional = {m for m in _optional_imports() if m not in core and m not in stdlib and m != "__future__"}
    assert optional, "expected optional imports (sklearn, scipy, nibabel, ...)"
    for mod in sorted(optional):
        name = dist.get(mod, mod).lower()
        holders = [e for e, reqs in extras.items() if e != "test"
                   and any(r.lower().startswith(name) for r in reqs)]
        assert holders, f"{mod} is imported optionally but no extra installs it"
        assert EXTRAS.get(mod) in holders, f"segcal.cli.app.EXTRAS[{mod!r}] should name one of {holders}"
    assert any(r.startswith("scikit-learn") for r in extras["isotonic"])
