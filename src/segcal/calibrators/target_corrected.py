"""A fitted calibrator followed by one temperature correction: :class:`TargetCorrected`
(``base(z) / c``), what target-adaptive recalibration returns (``../shared/methods.md`` §9.2,
:func:`segcal.estimation.target_adaptive.adapt_to_target`)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from segcal.calibrators.base import Calibrator
from segcal.calibrators.registry import create, register

__all__ = ["TargetCorrected"]


@register
class TargetCorrected(Calibrator):
    """A base calibrator followed by one temperature correction: ``base(z) / c``, ``c > 0``.

    What target-adaptive recalibration returns (:func:`segcal.estimation.adapt_to_target`,
    methods.md §9.2): the calibrator fitted on the (labelled) source, corrected on the unlabelled
    target. ``fit`` fits the base first when it is not fitted yet, then ``c`` alone by the one
    fitting loop (TS on the base's outputs: what PseudoCal fits on its pseudo-target set); the
    base's parameters stay frozen. :meth:`wrap` builds one from an already fitted calibrator.

    Parameters
    ----------
    base, base_config
        The base calibrator's registered name and constructor arguments (its ``get_config()``
        without ``num_classes``); default ``"ts"``.
    init_correction
        Initial ``c`` (1 = the base unchanged).
    **kw
        Common :class:`Calibrator` arguments, of the correction's fit and (unless ``base_config``
        sets them) of the base's; ``input_type`` is the base's.

    Guarantees: those of the base (dividing by one positive scalar keeps every order); spatial
    when the base is.
    """

    name = "target_corrected"
    aliases = ("corrected", "temperature_corrected")
    description = "base(z) / c: a fitted calibrator with one temperature correction (target adaptation)"
    section = "§9.2 + §3.1"
    translation_invariant = True
    argmax_preserving = True
    order_preserving = True
    default_adam_lr = 0.05

    def __init__(self, num_classes: int | None = None, *, base: str = "ts",
                 base_config: dict[str, Any] | None = None, init_correction: float = 1.0,
                 **kw: Any) -> None:
        if str(base).lower().replace("-", "_") in ("target_corrected", "corrected", "temperature_corrected"):
            raise ValueError("base: a target-corrected calibrator cannot be its own base; wrap its base")
        if not (init_correction > 0 and math.isfinite(init_correction)):
            raise ValueError(f"init_correction: expected a finite value > 0, got {init_correction}")
        cfg = dict(base_config or {})
        cfg.pop("num_classes", None)
        base_obj = create(base, **{**kw, **cfg})  # the common arguments reach the base too
        kw["input_type"] = base_obj.input_type
        super().__init__(None, **kw)
        self.base = base_obj
        self.base_config = cfg
        self.init_correction = float(init_correction)
        self._declare_from(base_obj)
        self._fix_classes(num_classes)

    def _extra_config(self) -> dict[str, Any]:
        return {"base": self.base.name, "base_config": dict(self.base_config),
                "init_correction": self.init_correction}

    def _build(self, num_classes: int) -> None:
        if self.base.num_classes != num_classes:
            self.base._build_params(num_classes)
        self.log_c = nn.Parameter(torch.tensor(math.log(self.init_correction), dtype=torch.float32))

    @classmethod
    def wrap(cls, calibrator: Calibrator, correction: float = 1.0, **kw: Any) -> TargetCorrected:
        """A fitted ``TargetCorrected`` around a copy of the fitted ``calibrator`` with correction ``c``
        (a ``TargetCorrected`` is unwrapped: its base is kept and the corrections multiply)."""
        calibrator._check_ready()
        if isinstance(calibrator, TargetCorrected):
            correction = float(correction) * calibrator.correction
            calibrator = calibrator.base
        cfg = calibrator.get_config()
        num_classes = cfg.pop("num_classes")
        obj = cls(num_classes, base=calibrator.name, base_config=cfg, init_correction=1.0, **kw)
        obj.base.load_state_dict(calibrator.state_dict())
        obj.base.is_fitted = True
        obj.base.fit_info = dict(calibrator.fit_info)
        obj.set_correction(correction)
        obj.base.to(calibrator.device)
        obj.to(calibrator.device)
        obj.is_fitted = True
        obj.eval()
        return obj

    @property
    def correction(self) -> float:
        """The fitted correction ``c`` (calibrated logits = ``base(z) / c``)."""
        return float(torch.exp(self.log_c.detach()))

    def set_correction(self, c: float) -> None:
        """Set ``c`` (e.g. from a label-free search)."""
        if not (c > 0 and math.isfinite(c)):
            raise ValueError(f"correction: expected a finite value > 0, got {c}")
        with torch.no_grad():
            self.log_c.fill_(math.log(float(c)))

    @property
    def uses_image(self) -> bool:
        return self.base.uses_image

    @property
    def image_channels_needed(self) -> int | None:
        return self.base.image_channels_needed

    @property
    def spatial_dims(self) -> int | None:  # the TorchScript export traces on the base's rank
        return getattr(self.base, "spatial_dims", None)

    def _fit_stages(self) -> list[tuple[str, list[nn.Parameter]]]:
        return [("correction", [self.log_c])]

    def fit(self, logits: Any, labels: Any = None, **kw: Any) -> TargetCorrected:
        """Fit the base when it is not fitted, then the correction ``c`` (same arguments as
        :meth:`Calibrator.fit`)."""
        if not self.base.is_fitted:
            self.base.fit(logits, labels, **kw)
        super().fit(logits, labels, **kw)
        return self

    def _base_out(self, x: torch.Tensor, image: torch.Tensor | None, whole: bool) -> torch.Tensor:
        u = F.log_softmax(x, 1) if self.base.input_space == "logprobs" else x
        if whole:
            return self.base._apply_image_map(u, image)
        return self.base._map(u)

    def _map(self, rows: torch.Tensor) -> torch.Tensor:
        return self._base_out(rows, None, self.spatial) / torch.exp(self.log_c)

    def _map_image(self, x: torch.Tensor, image: torch.Tensor | None = None) -> torch.Tensor:
        if not self.spatial:
            return super()._map_image(x)
        return self._base_out(x, image, True) / torch.exp(self.log_c)

    # a pointwise base's output does not depend on c: cached for full-batch L-BFGS
    def _features(self, rows: torch.Tensor) -> tuple[Any, ...] | None:
        return None if self.spatial else (self._base_out(rows, None, False),)

    def _map_features(self, feats: tuple[Any, ...]) -> torch.Tensor:
        return feats[0] / torch.exp(self.log_c)

    @classmethod
    def _from_payload(cls, payload: dict[str, Any]) -> Calibrator:
        obj = super()._from_payload(payload)
        obj.base.is_fitted = True  # type: ignore[attr-defined]
        obj.base.eval()  # type: ignore[attr-defined]
        return obj
