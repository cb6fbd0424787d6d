"""The one registry of calibrators: names, aliases, properties, creation and loading.

``create("ts")`` builds a calibrator from its name or alias (case-insensitive);
``available()`` lists every registered calibrator with its declared properties (what
``segcal calibrators`` prints); ``load(path)`` rebuilds a calibrator saved with
:meth:`segcal.calibrators.base.Calibrator.save` (loaded with ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import os
from typing import Any

from segcal.calibrators.persistence import FORMAT, VERSION, read_calibrator_file
from segcal.errors import InputError

__all__ = ["FORMAT", "VERSION", "available", "create", "load", "register", "resolve"]

_REGISTRY: dict[str, type] = {}
_DISPLAY_ORDER = ("ts", "vs", "ms", "msc", "dc", "ets", "cdc", "cmsap", "cmsop", "vs_ti", "ms_ti")
_ALIASES: dict[str, str] = {}


def _key(name: str) -> str:
    return str(name).strip().lower().replace("-", "_")


def register(cls: type) -> type:
    """Class decorator: register ``cls`` under ``cls.name`` and ``cls.aliases``."""
    name = _key(cls.name)
    if not name:
        raise ValueError(f"{cls.__name__}: a registered calibrator needs a non-empty `name`")
    for key in (name, *(_key(a) for a in cls.aliases)):
        owner = _ALIASES.get(key)
        if owner is not None and owner != name:
            raise ValueError(f"calibrator name/alias {key!r} is already taken by {owner!r}")
    _REGISTRY[name] = cls
    _ALIASES[name] = name
    for a in cls.aliases:
        _ALIASES[_key(a)] = name
    return cls


def resolve(name: str) -> type:
    """Return the calibrator class for a name or alias."""
    key = _key(name)
    if key not in _ALIASES:
        raise ValueError(
            f"method: unknown calibrator {name!r}; available: {', '.join(sorted(_REGISTRY))} "
            "(see `segcal calibrators` for aliases)"
        )
    return _REGISTRY[_ALIASES[key]]


def create(name: str, **kwargs: Any):
    """Create a calibrator by name or alias, e.g. ``create("ts")`` or ``create("cmsop", lr=0.01)``."""
    return resolve(name)(**kwargs)


def available() -> list[dict[str, Any]]:
    """Every registered calibrator: name, aliases, properties, description, methods.md section."""
    out = []
    order = {n: i for i, n in enumerate(_DISPLAY_ORDER)}
    names = sorted(_REGISTRY, key=lambda n: (order.get(n, len(order)), list(_REGISTRY).index(n)))
    for name in names:
        cls = _REGISTRY[name]
        out.append(
            {
                "name": name,
                "aliases": list(cls.aliases),
                "translation_invariant": bool(cls.translation_invariant),
                "argmax_preserving": bool(cls.argmax_preserving),
                "order_preserving": bool(cls.order_preserving),
                "spatial": bool(cls.spatial),
                "preservation_note": str(getattr(cls, "preservation_note", "")),
                "description": cls.description,
                "section": cls.section,
            }
        )
    return out


def load(path: str | os.PathLike, map_location: Any = "cpu"):
    """Load a calibrator saved with ``Calibrator.save`` (safe: ``weights_only=True``).

    Raises ``FileNotFoundError`` for a missing file and an :class:`~segcal.errors.InputError`
    naming the file for anything else that is not a loadable calibrator (see
    :func:`segcal.calibrators.persistence.read_calibrator_file`): the loaded calibrator is in
    eval mode, its parameters finite and without gradients.
    """
    payload = read_calibrator_file(path, map_location=map_location)
    where = f"calibrator: {os.fspath(path)}"
    key = _key(payload["name"])
    if key not in _ALIASES:
        raise InputError(f"{where} holds an unknown calibrator {payload['name']!r}; this segcal has "
                         f"{', '.join(sorted(_REGISTRY))}")
    try:
        return _REGISTRY[_ALIASES[key]]._from_payload(payload)
    except (TypeError, ValueError, RuntimeError, KeyError) as exc:  # config or state not of this calibrator
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"{where}: its config or state does not rebuild a {payload['name']!r} "
                         f"calibrator ({msg})") from None
