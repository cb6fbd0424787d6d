"""segcal.integrations.lightning.CalibrationCallback: validation metrics and a calibrator after fit."""

from __future__ import annotations

import warnings

import lightning.pytorch as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import segcal
from segcal.errors import InputError
from segcal.integrations.lightning import CalibrationCallback, split_batch
from segcal.metrics import CalibrationMetrics
from segcal.pipeline.fit_model import fit_from_model


class TinySeg(L.LightningModule):
    """A 2-layer conv net predicting 3 classes at half resolution (logits resized by the callback)."""

    def __init__(self, returns: str = "logits") -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 2, stride=2))
        self.returns = returns

    def forward(self, x):
        return self.net(x)

    def _loss(self, batch):
        x, y = batch
        logits = nn.functional.interpolate(self(x), size=y.shape[1:], mode="bilinear", align_corners=False)
        return nn.functional.cross_entropy(logits, y, ignore_index=255), logits

    def training_step(self, batch, batch_idx):
        return self._loss(batch)[0]

    def validation_step(self, batch, batch_idx):
        loss, logits = self._loss(batch)
        return {"loss": loss, "logits": logits} if self.returns == "logits" else loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def _loaders():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 3, 16, 16, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()  # learnable classes 0..2
    y[:, :2] = 255
    return (DataLoader(TensorDataset(x[:8], y[:8]), batch_size=4),
            DataLoader(TensorDataset(x[8:], y[8:]), batch_size=2), x[8:], y[8:])


def _trainer(tmp_path, callback):
    return L.Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=tmp_path, callbacks=[callback])


@pytest.mark.parametrize("returns", ["logits", "loss"])
def test_two_epoch_fit_logs_metrics_and_saves_a_calibrator(tmp_path, returns):
    torch.manual_seed(0)
    train, val, xv, yv = _loaders()
    model = TinySeg(returns)
    cb = CalibrationCallback(3, fit="ts", ignore_index=255, fit_kwargs={"max_iter": 50})
    with warnings.catch_warnings():  # Lightning's notes on num_workers and the small dataset
        warnings.simplefilter("ignore")
        _trainer(tmp_path, cb).fit(model, train, val)
    model.eval()
    with torch.no_grad():
        logits = nn.functional.interpolate(model(xv), size=(16, 16), mode="bilinear", align_corners=False)
    ref = CalibrationMetrics(3, ignore_index=255)
    ref.update(logits, yv)
    ref_m = ref.compute()
    # the last validation epoch's metrics, logged through pl_module.log
    trainer_metrics = cb.metrics
    assert trainer_metrics is not None
    for key in ("ece", "nll", "brier", "image_ece"):
        assert trainer_metrics[key] == pytest.approx(ref_m[key], abs=1e-9), key
    # the calibrator beside the checkpoints, loadable with segcal.load, equal to fitting directly
    path = tmp_path / "checkpoints" / "calibrator.pt"
    assert cb.calibrator_path == path and path.is_file()
    cal = segcal.load(path)
    direct = fit_from_model(model, val, "ts", ignore_index=255, num_classes=3, max_iter=50)
    assert float(cal.temperature) == pytest.approx(float(direct.temperature), rel=1e-6)
    calibrated = segcal.CalibratedModel(model.net, cal)
    probs = calibrated(xv)
    assert probs.shape == (4, 3, 16, 16)
    torch.testing.assert_close(probs.sum(1), torch.ones(4, 16, 16))
    after = CalibrationMetrics(3, ignore_index=255, input_type="probs")
    after.update(probs, yv)
    assert after.compute()["nll"] <= ref_m["nll"] + 1e-9  # the fitted temperature does not raise NLL on its data


def test_logged_values_and_no_fit(tmp_path):
    torch.manual_seed(1)
    train, val, _xv, _yv = _loaders()
    cb = CalibrationCallback(3, ignore_index=255, log_keys=("ece", "miou"), prefix="calib/")
    trainer = _trainer(tmp_path, cb)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(TinySeg(), train, val)
    logged = trainer.callback_metrics
    assert float(logged["calib/ece"]) == pytest.approx(cb.metrics["ece"], abs=1e-6)  # Lightning stores float32
    assert float(logged["calib/miou"]) == pytest.approx(cb.metrics["miou"], abs=1e-6)
    assert cb.calibrator is None and not (tmp_path / "checkpoints" / "calibrator.pt").exists()


def test_bad_arguments_fail_before_training():
    with pytest.raises(ValueError, match="unknown calibrator"):
        CalibrationCallback(3, fit="no-such-method")
    with pytest.raises(InputError, match="batch_transform"):
        split_batch({"img": torch.zeros(1), "seg": torch.zeros(1)})
    x, y, mask = split_batch({"pixel_values": 1, "labels": 2})
    assert (x, y, mask) == (1, 2, None)


# ------------------------------------------------------------------ two processes (ddp_spawn, gloo)
class _Recording(CalibrationCallback):
    """Writes what each rank saw at the end of training (ddp_spawn runs the callback in copies)."""

    def __init__(self, out: str, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.out = out

    def on_train_end(self, trainer, pl_module) -> None:
        super().on_train_end(trainer, pl_module)
        torch.save({"metrics": {k: v for k, v in self.metrics.items() if isinstance(v, float)},
                    "path": str(self.calibrator_path), "temperature": float(self.calibrator.temperature),
                    "weights": {k: v.cpu() for k, v in pl_module.state_dict().items()}},
                   f"{self.out}/rank{trainer.global_rank}.pt")


@pytest.mark.slow
def test_two_processes_log_the_total_and_rank_zero_fits_the_whole_set(tmp_path):
    torch.manual_seed(0)
    train, val, xv, yv = _loaders()
    cb = _Recording(str(tmp_path), 3, fit="ts", ignore_index=255, fit_kwargs={"max_iter": 50})
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=2, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[cb])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(TinySeg(), train, val)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    model = TinySeg()
    model.load_state_dict(ranks[0]["weights"])  # DDP: the same weights on both ranks
    model.eval()
    with torch.no_grad():
        logits = nn.functional.interpolate(model(xv), size=(16, 16), mode="bilinear", align_corners=False)
    ref = CalibrationMetrics(3, ignore_index=255)
    ref.update(logits, yv)
    ref_m = ref.compute()
    direct = fit_from_model(model, val, "ts", ignore_index=255, num_classes=3, max_iter=50)
    for r in ranks:  # each rank saw half the validation images; both log the total
        for key in ("ece", "nll", "image_ece"):
            assert r["metrics"][key] == pytest.approx(ref_m[key], abs=1e-9), key
        assert r["path"] == str(tmp_path / "checkpoints" / "calibrator.pt")
        assert r["temperature"] == pytest.approx(float(direct.temperature), rel=1e-6)  # rank 1 loaded rank 0's
