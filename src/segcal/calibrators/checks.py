"""Check a calibrator against its declared properties, as scikit-learn's ``check_estimator`` does.

:func:`check_calibrator` fits a calibrator (a registered name, a :class:`Calibrator` subclass --
registered or not, e.g. a user's own -- or an instance used as a template) on a miscalibrated
problem and runs every check below on it; each check is also a public function returning a
:class:`CheckResult`, so a test suite can run one check and assert on its measured values.

Checks (``../shared/methods.md`` §2 defines the properties):

``fit``
    Fitting lowers the held-out NLL of over-confident logits by more than 0.1 nats.
``translation_invariance``
    Declared TI: adding a per-pixel constant to the logits changes the calibrated
    log-probabilities by less than 2e-3. With ``exact=True`` an undeclared TI must be absent
    (a change above 0.1).
``argmax_preservation``
    Declared AP (on a million random pixels, parameters perturbed so that the guarantee is
    structural, not a property of the fitted values): the input's top class is a maximum of the
    output everywhere and THE argmax wherever the input's top two differ by more than 1e-3.
``order_preservation``
    Declared OP: no pair of classes is reversed; resolved pairs stay strictly ordered (at least
    ``min_strict`` of them: a mixture such as ETS may round some to ties).
``undeclared_properties``
    With ``exact=True``: an undeclared OP (or AP) really is absent, so the declarations are exact.
``finite_outputs``
    Finite outputs for logits of magnitude up to 6e4 (float32 and float16 input).
``numpy_and_volumes``
    numpy in -> numpy out (float32, probabilities summing to one); a 3D volume equals its pixel
    rows (pointwise calibrators); float16 input equals its float32 up-cast.
``probability_inputs``
    ``input_type="probs"``: fits on probabilities, lowers their NLL, refuses logits.
``bad_input``
    Clear ``ValueError`` messages for a bad shape, class count, NaN, label range, empty input, a
    mask without valid pixels, mismatched labels; ``ignore_index`` works; use before fit raises
    :class:`~segcal.calibrators.base.NotFittedError`.
``save_load``
    The saved file loads back (through :func:`segcal.calibrators.load` when the class is
    registered, else through the class itself) with the same config, outputs and properties.
``torchscript``
    ``to_torchscript()`` equals the eager calibrator on two input shapes.
"""

from __future__ import annotations

import copy
import os
import re
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from segcal.calibrators.base import Calibrator, NotFittedError
from segcal.calibrators.persistence import FORMAT, VERSION, read_calibrator_file
from segcal.calibrators.registry import create, load, resolve

__all__ = [
    "CHECKS",
    "CalibratorCheckError",
    "CheckResult",
    "check_argmax_preservation",
    "check_bad_input",
    "check_calibrator",
    "check_finite_outputs",
    "check_fit",
    "check_numpy_and_volumes",
    "check_order_preservation",
    "check_probability_inputs",
    "check_save_load",
    "check_torchscript",
    "check_translation_invariance",
    "check_undeclared_properties",
    "fitted_for_checks",
    "make_problem",
    "perturbed",
]

Factory = Callable[..., Calibrator]


@dataclass
class CheckResult:
    """Outcome of one check: ``passed`` (``skipped`` when the property is not declared), a
    message saying what was found, and the measured values in ``details``."""

    name: str
    passed: bool
    message: str = ""
    skipped: bool = False
    details: dict[str, Any] = field(default_factory=dict)


class CalibratorCheckError(AssertionError):
    """Raised by :func:`check_calibrator` (``on_fail="raise"``) listing the failed checks."""

    def __init__(self, label: str, failures: list[CheckResult]) -> None:
        self.failures = failures
        lines = "\n".join(f"  {r.name}: {r.message}" for r in failures)
        super().__init__(f"{label}: {len(failures)} check(s) failed:\n{lines}")


def make_problem(n: int = 3000, c: int = 4, scale: float = 3.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Over-confident logits ``scale · z`` ``(n, c)`` and labels from a calibrated source
    ``y ~ Cat(softmax(z))``, ``z ~ 1.5 · N(0, 1)``."""
    g = torch.Generator().manual_seed(seed)
    z = 1.5 * torch.randn(n, c, generator=g)
    u = torch.rand(n, c, generator=g).clamp_min(1e-20)
    y = (z - torch.log(-torch.log(u))).argmax(1)
    return scale * z, y


def perturbed(cal: Calibrator, seed: int = 1) -> Calibrator:
    """A copy with generic (random) parameters: structural guarantees must hold for any values.

    Noise of 0.5 per parameter; convolution kernels (``ndim >= 4``, LTS/IBTS) get
    ``0.5 / sqrt(taps)``, the order of a trained kernel (0.5 per tap would drive the temperature
    to its floor, where float rounding of the input is amplified).
    """
    cal = copy.deepcopy(cal)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in cal.parameters():
            scale = 0.5 / float(np.sqrt(p[0].numel())) if p.ndim >= 4 else 0.5
            p.add_(scale * torch.randn(p.shape, generator=g))
    return cal


def _factory(calibrator: str | type | Calibrator) -> tuple[Factory, str]:
    """A function building a fresh, unfitted calibrator (keyword overrides allowed), and a label."""
    if isinstance(calibrator, str):
        return (lambda **kw: create(calibrator, **kw)), calibrator
    if isinstance(calibrator, type) and issubclass(calibrator, Calibrator):
        return (lambda **kw: calibrator(**kw)), calibrator.__name__
    if isinstance(calibrator, Calibrator):
        cfg = calibrator.get_config()
        cfg.pop("num_classes", None)
        cls = type(calibrator)
        return (lambda **kw: cls(**{**cfg, **kw})), cls.__name__
    raise TypeError(f"calibrator: expected a registered name, a Calibrator subclass or instance, "
                    f"got {type(calibrator).__name__}")


def _fit_defaults(factory: Factory) -> dict[str, Any]:
    """Short fits: 30 L-BFGS iterations; spatial calibrators 150 Adam steps at lr 0.01."""
    return {"max_iter": 30, **({"max_steps": 150, "lr": 0.01} if factory().spatial else {})}


def fitted_for_checks(calibrator: str | type | Calibrator, num_classes: int = 4,
                      fit_kw: dict[str, Any] | None = None) -> Calibrator:
    """The calibrator the checks run on: built fresh and fitted on :func:`make_problem`."""
    factory, _ = _factory(calibrator)
    kw = _fit_defaults(factory) if fit_kw is None else dict(fit_kw)
    x, y = make_problem(c=num_classes)
    return factory(**kw).fit(x, y)


def _result(name: str, ok: bool, message: str, **details: Any) -> CheckResult:
    return CheckResult(name, bool(ok), message, details=details)


# ----------------------------------------------------------------------------- the checks
def check_fit(cal: Calibrator, seed: int = 5) -> CheckResult:
    """Held-out NLL before / after calibration of a fresh draw of :func:`make_problem`."""
    x, y = make_problem(c=int(cal.num_classes), seed=seed)
    before = F.cross_entropy(x, y).item()
    with torch.no_grad():
        after = F.cross_entropy(cal(x), y).item()
    return _result("fit", after < before - 0.1,
                   f"held-out NLL {before:.4f} -> {after:.4f} (expected a decrease > 0.1)",
                   before=before, after=after)


def check_translation_invariance(cal: Calibrator, *, exact: bool = False, n: int = 500,
                                 seed: int = 2) -> CheckResult:
    """Largest change of the calibrated log-probabilities when a per-pixel constant in
    ``[-10, 10]`` is added to the logits (perturbed parameters)."""
    p = perturbed(cal)
    c = int(cal.num_classes)
    g = torch.Generator().manual_seed(seed)
    x = 2 * torch.randn(n, c, generator=g)
    shift = 20 * torch.rand(n, 1, generator=g) - 10  # a different constant per pixel
    with torch.no_grad():
        diff = float((F.log_softmax(p(x), 1) - F.log_softmax(p(x + shift), 1)).abs().max())
    if cal.translation_invariant:
        return _result("translation_invariance", diff < 2e-3,
                       f"declares TI; shifting the logits changed the output by {diff:.3g} (limit 2e-3)",
                       max_change=diff)
    return _result("translation_invariance", diff > 0.1 or not exact,
                   f"does not declare TI; shifting the logits changed the output by {diff:.3g}"
                   + (" (looks TI: declare it)" if diff <= 0.1 else ""), max_change=diff)


def _random_pixels(c: int, n: int = 10**6, seed: int = 3) -> torch.Tensor:
    return 3 * torch.randn(n, c, generator=torch.Generator().manual_seed(seed))


def check_argmax_preservation(cal: Calibrator, n: int = 10**6, seed: int = 3) -> CheckResult:
    """Declared AP on ``n`` random pixels: pixels whose top class is not a maximum of the output,
    and resolved pixels (top-two gap > 1e-3) whose argmax changed."""
    if not cal.argmax_preserving:
        return CheckResult("argmax_preservation", True, "not declared", skipped=True)
    x = _random_pixels(int(cal.num_classes), n, seed)
    with torch.no_grad():
        out = perturbed(cal)(x)
    top = x.argmax(1)
    not_max = int((out.gather(1, top[:, None]).squeeze(1) < out.max(1).values).sum())
    s = x.topk(2, 1).values
    resolved = (s[:, 0] - s[:, 1]) > 1e-3
    flipped = int((out.argmax(1) != top)[resolved].sum())
    return _result("argmax_preservation", not_max == 0 and flipped == 0,
                   f"declares AP; {flipped} of {int(resolved.sum())} resolved pixels changed their argmax, "
                   f"{not_max} lost their top class as a maximum", flipped=flipped, not_max=not_max)


def check_order_preservation(cal: Calibrator, n: int = 10**6, seed: int = 3,
                             min_strict: float = 0.99) -> CheckResult:
    """Declared OP on ``n`` random pixels: reversed pairs (must be none) and the fraction of
    resolved pairs (gap > 1e-3) kept strictly ordered (at least ``min_strict``)."""
    if not cal.order_preserving:
        return CheckResult("order_preservation", True, "not declared", skipped=True)
    x = _random_pixels(int(cal.num_classes), n, seed)
    with torch.no_grad():
        out = perturbed(cal)(x)
    s, perm = torch.sort(x, 1, descending=True)
    step = out.gather(1, perm).diff(dim=1)  # must be <= 0 along the input's order
    reversed_ = int((step > 0).sum())
    resolved = (s[:, :-1] - s[:, 1:]) > 1e-3
    strict = float((step[resolved] < 0).float().mean())
    return _result("order_preservation", reversed_ == 0 and strict >= min_strict,
                   f"declares OP; {reversed_} class pairs reversed, {strict:.6f} of the resolved pairs "
                   f"strictly ordered (at least {min_strict} expected)", reversed=reversed_, strict_fraction=strict)


def check_undeclared_properties(cal: Calibrator, *, exact: bool = False, n: int = 20000,
                                seed: int = 4) -> CheckResult:
    """An undeclared OP (AP) is really absent: some pixel changes its order (argmax)."""
    if cal.order_preserving:
        return CheckResult("undeclared_properties", True, "declares OP", skipped=True)
    x = 3 * torch.randn(n, int(cal.num_classes), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        out = perturbed(cal)(x)
    what = "order" if cal.argmax_preserving else "argmax"
    changed = (out.argsort(1) != x.argsort(1)).any(1) if cal.argmax_preserving else out.argmax(1) != x.argmax(1)
    k = int(changed.sum())
    return _result("undeclared_properties", k > 0 or not exact,
                   f"does not declare {'OP' if what == 'order' else 'AP'}; {k} of {n} pixels changed their {what}"
                   + (" (looks preserved: declare it)" if k == 0 else ""), changed=k)


def check_finite_outputs(cal: Calibrator, seed: int = 9) -> CheckResult:
    """Outputs stay finite for logits of magnitude 3 to 6e4 (float32) and for float16 extremes."""
    g = torch.Generator().manual_seed(seed)
    c = int(cal.num_classes)
    bad = []
    for scale in (3.0, 30.0, 1e3, 6e4):
        x = scale * torch.randn(2000, c, generator=g)
        for t in (x, x.clamp(-65504, 65504).half()):
            with torch.no_grad():
                if not bool(torch.isfinite(cal(t)).all()):
                    bad.append(f"scale {scale:g} {str(t.dtype).replace('torch.', '')}")
    return _result("finite_outputs", not bad, f"non-finite outputs for logits of {bad}" if bad else "finite",
                   failing=bad)


def check_numpy_and_volumes(cal: Calibrator, seed: int = 6) -> CheckResult:
    """numpy in -> numpy out; volumes equal their pixel rows (pointwise); float16 == its up-cast."""
    c = int(cal.num_classes)
    g = torch.Generator().manual_seed(seed)
    try:
        shape = (2, c, 6, 7) if cal.spatial else (2, c, 3, 4, 5)
        vol = torch.randn(*shape, generator=g)
        p = cal.predict_proba(vol.numpy())
        assert isinstance(p, np.ndarray) and p.shape == shape and p.dtype == np.float32, "numpy in -> numpy out"
        np.testing.assert_allclose(p.sum(1), 1, atol=1e-5, err_msg="probabilities sum to one")
        with torch.no_grad():
            if not cal.spatial:  # whole-image maps have no per-row identity
                rows = vol.movedim(1, -1).reshape(-1, c)
                ref = cal(rows).reshape(*shape[:1], *shape[2:], c).movedim(-1, 1)
                torch.testing.assert_close(cal(vol), ref, msg=lambda m: "volume != its rows: " + m)
            torch.testing.assert_close(cal(vol.to(torch.float16)), cal(vol.half().float()),
                                       msg=lambda m: "float16 input != its float32 up-cast: " + m)
        assert isinstance(cal(vol.numpy()), np.ndarray), "forward: numpy in -> numpy out"
    except AssertionError as exc:
        return _result("numpy_and_volumes", False, str(exc).splitlines()[0])
    return _result("numpy_and_volumes", True, "ok")


def check_probability_inputs(calibrator: str | type | Calibrator, num_classes: int = 4) -> CheckResult:
    """``input_type="probs"``: a fresh ``calibrator`` (name, class or template instance, as in
    :func:`check_calibrator`) fits on probabilities, lowers their NLL and refuses logits."""
    make = _factory(calibrator)[0]
    x, y = make_problem(1500, c=num_classes)
    p = F.softmax(x, 1)
    cal = make(input_type="probs", max_iter=20).fit(p, y)
    with torch.no_grad():
        q = cal.predict_proba(p)
    before, after = float(F.nll_loss(torch.log(p), y)), float(F.nll_loss(torch.log(q), y))
    if not bool(torch.isfinite(q).all()) or not after < before:
        return _result("probability_inputs", False, f"probabilities in: NLL {before:.4f} -> {after:.4f}, "
                       f"finite={bool(torch.isfinite(q).all())}", before=before, after=after)
    err = _expect(ValueError, "probabilities", lambda: cal(x))
    return _result("probability_inputs", err is None, err or "ok", before=before, after=after)


def _expect(exc: type[BaseException] | tuple[type[BaseException], ...], pattern: str | None,
            fn: Callable[[], Any]) -> str | None:
    """None when ``fn()`` raises ``exc`` with a message matching ``pattern``, else what happened."""
    try:
        fn()
    except exc as e:
        if pattern is None or re.search(pattern, str(e)):
            return None
        return f"raised {type(e).__name__}({str(e)[:200]!r}), expected a message matching {pattern!r}"
    except Exception as e:  # reported, not raised
        return f"raised {type(e).__name__}({str(e)[:200]!r}), expected {exc}"
    return f"raised nothing, expected {exc} matching {pattern!r}"


def check_bad_input(cal: Calibrator, template: str | type | Calibrator | None = None) -> CheckResult:
    """Clear errors for bad input (see the module docstring) from the fitted ``cal`` and from fresh
    calibrators built from ``template`` (a name, class or instance; default ``cal``'s config)."""
    make = _factory(cal if template is None else template)[0]
    c = int(cal.num_classes)
    x, y = make_problem(200, c=c)
    bad = x.clone()
    bad[3, 1] = float("nan")
    yy = y.clone()
    yy[0] = c
    cases: list[tuple[str, Any, str | None, Callable[[], Any]]] = [
        ("1-D logits", ValueError, r"logits: expected shape", lambda: cal(torch.randn(5))),
        ("wrong class count", ValueError, rf"expected {c} classes", lambda: cal(torch.randn(3, c + 1, 2, 2))),
        ("NaN logits (forward)", ValueError, "non-finite", lambda: cal(bad)),
        ("NaN logits (fit)", ValueError, "non-finite", lambda: make().fit(bad, y)),
        ("label out of range", ValueError, rf"labels \[{c}\] are outside \[0, {c}\)", lambda: make().fit(x, yy)),
        ("empty input", ValueError, "empty input", lambda: make().fit(x[:0], y[:0])),
        ("mask without valid pixels", ValueError, "no valid pixels",
         lambda: make().fit(x, y, mask=torch.zeros(200, dtype=torch.bool))),
        ("labels of another size", ValueError, "does not match", lambda: make().fit(x, y[:10])),
        ("use before fit", NotFittedError, None, lambda: make()(x)),
    ]
    for what, exc, pattern, fn in cases:
        err = _expect(exc, pattern, fn)
        if err is not None:
            return _result("bad_input", False, f"{what}: {err}", case=what)
    try:
        make(max_iter=2).fit(x, torch.where(torch.arange(200) == 0, 255, y), ignore_index=255)
    except Exception as e:  # reported
        return _result("bad_input", False, f"ignore_index=255: fit raised {type(e).__name__}: {e}", case="ignore_index")
    return _result("bad_input", True, "ok")


def check_save_load(cal: Calibrator, directory: str | os.PathLike | None = None) -> CheckResult:
    """Save, load back, compare config, outputs and the file's declared properties."""
    with tempfile.TemporaryDirectory(prefix="segcal-check-") as tmp:
        path = Path(directory or tmp) / f"{cal.name or 'calibrator'}.pt"
        cal.save(path)
        try:
            registered = resolve(cal.name) is type(cal)
        except ValueError:
            registered = False
        back = load(path) if registered else type(cal)._from_payload(read_calibrator_file(path))
        payload = torch.load(path, weights_only=True)
        x = torch.randn(50, int(cal.num_classes), generator=torch.Generator().manual_seed(11))
        problems = []
        if type(back) is not type(cal):
            problems.append(f"loaded a {type(back).__name__}")
        if back.get_config() != cal.get_config():
            problems.append("get_config() differs after load")
        with torch.no_grad():
            if not torch.allclose(back(x), cal(x), rtol=1.3e-6, atol=1e-5):
                problems.append("outputs differ after load")
        if payload["format"] != FORMAT or payload["version"] != VERSION:
            problems.append(f"file format {payload['format']!r} v{payload['version']}")
        if payload["properties"] != cal.properties():
            problems.append("the file's properties differ from the declared ones")
    note = "" if registered else " (not registered: loaded through the class; segcal.load needs @register)"
    return _result("save_load", not problems, "; ".join(problems) + note if problems else "ok" + note,
                   registered=registered, file_properties=payload["properties"])


def check_torchscript(cal: Calibrator) -> CheckResult:
    """The TorchScript export equals the eager calibrator on two input shapes."""
    c = int(cal.num_classes)
    g = torch.Generator().manual_seed(7)
    shapes = [(2, c, 6, 7), (1, c, 9, 5)] if cal.spatial else [(2, c, 3, 4), (9, c)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        m = cal.to_torchscript()
    worst = 0.0
    with torch.no_grad():
        for shape in shapes:
            x = torch.randn(*shape, generator=g)
            worst = max(worst, float((m(x) - cal(x)).abs().max()))
    return _result("torchscript", worst < 1e-4, f"export vs eager: max difference {worst:.3g} (limit 1e-4)",
                   max_difference=worst)


#: every check of :func:`check_calibrator`, in the order they run
CHECKS: tuple[str, ...] = (
    "fit", "translation_invariance", "argmax_preservation", "order_preservation",
    "undeclared_properties", "finite_outputs", "numpy_and_volumes", "probability_inputs",
    "bad_input", "save_load", "torchscript",
)


def check_calibrator(
    calibrator: str | type | Calibrator,
    *,
    num_classes: int = 4,
    exact: bool = False,
    fit_kw: dict[str, Any] | None = None,
    checks: Sequence[str] | None = None,
    on_fail: str | None = "raise",
) -> list[CheckResult]:
    """Check a calibrator against its declared properties (TI / AP / OP) and the contract.

    Parameters
    ----------
    calibrator
        A registered name (``"ts"``), a :class:`Calibrator` subclass (a user's own need not be
        registered) or an instance (its config is the template; a fresh copy is fitted).
    num_classes
        Classes of the synthetic problem (:func:`make_problem`).
    exact
        Also require undeclared properties to be absent (the declarations are exact), as the
        built-in calibrators do; by default declaring less than holds is allowed.
    fit_kw
        Constructor arguments of the fitted calibrator (default: short fits, 30 L-BFGS iterations;
        150 Adam steps at lr 0.01 for spatial calibrators).
    checks
        Names from :data:`CHECKS` to run (default all).
    on_fail
        ``"raise"`` a :class:`CalibratorCheckError` listing every failed check (default),
        ``"warn"`` once per failure, or ``None``: just return the results.

    Returns
    -------
    list of CheckResult
        One per check run (``skipped`` for properties that are not declared).
    """
    if on_fail not in ("raise", "warn", None):
        raise ValueError(f"on_fail: expected 'raise', 'warn' or None, got {on_fail!r}")
    names = list(CHECKS if checks is None else checks)
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        raise ValueError(f"checks: unknown {unknown}; available: {list(CHECKS)}")
    label = _factory(calibrator)[1]
    try:
        cal = fitted_for_checks(calibrator, num_classes, fit_kw)
    except Exception as e:  # a calibrator that cannot fit fails every check
        results = [_result("fit", False, f"fit on the synthetic problem raised {type(e).__name__}: {e}")]
    else:
        run: dict[str, Callable[[], CheckResult]] = {
            "fit": lambda: check_fit(cal),
            "translation_invariance": lambda: check_translation_invariance(cal, exact=exact),
            "argmax_preservation": lambda: check_argmax_preservation(cal),
            "order_preservation": lambda: check_order_preservation(cal),
            "undeclared_properties": lambda: check_undeclared_properties(cal, exact=exact),
            "finite_outputs": lambda: check_finite_outputs(cal),
            "numpy_and_volumes": lambda: check_numpy_and_volumes(cal),
            "probability_inputs": lambda: check_probability_inputs(calibrator, num_classes),
            "bad_input": lambda: check_bad_input(cal, calibrator),
            "save_load": lambda: check_save_load(cal),
            "torchscript": lambda: check_torchscript(cal),
        }
        results = []
        for name in names:
            try:
                results.append(run[name]())
            except Exception as e:  # a crashing check is a failed check
                results.append(_result(name, False, f"raised {type(e).__name__}: {e}"))
    failures = [r for r in results if not r.passed]
    if failures and on_fail == "raise":
        raise CalibratorCheckError(label, failures)
    if on_fail == "warn":
        for r in failures:
            warnings.warn(f"{label}: check {r.name} failed: {r.message}", stacklevel=2)
    return results
