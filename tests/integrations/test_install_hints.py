"""Each integration module names the extra to install when its framework is missing."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

from segcal.errors import MissingDependencyError


@pytest.mark.parametrize(("module", "framework", "extra"), [
    ("segcal.integrations.torchmetrics", "torchmetrics", "bench"),
    ("segcal.integrations.monai", "monai", "medical"),
    ("segcal.integrations.ignite", "ignite", "ignite"),
    ("segcal.integrations.lightning", "lightning", "lightning"),
])
def test_a_missing_framework_gives_the_install_hint(monkeypatch, module, framework, extra):
    for name in list(sys.modules):
        if name == framework or name.startswith(framework + "."):
            monkeypatch.setitem(sys.modules, name, None)  # `import name` now raises ImportError
    monkeypatch.setitem(sys.modules, framework, None)
    monkeypatch.delitem(sys.modules, module, raising=False)
    with pytest.raises(MissingDependencyError, match=rf"pip install 'segcal\[{extra}\]'"):
        importlib.import_module(module)


def test_the_package_face_imports_no_framework():
    import segcal.integrations

    assert segcal.integrations.__all__ == []
    source = Path(segcal.integrations.__file__).read_text()
    assert "import " not in source.split('"""', 2)[2]  # the face holds no import at all
