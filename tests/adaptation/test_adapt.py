"""Source-free adaptation (segcal.adaptation, ``segcal adapt``): losses, BN, loop, resume, CLI."""

from __future__ import annotations

import builtins
import json
import math
import pathlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from segcal.adaptation import (
    CalSFDALoss,
    adapt,
    bn_parameters,
    bn_train_mode,
    class_weights,
    entropy_term,
    estimate_target_ece,
    evaluate_source_ece,
    load_checkpoint,
    mean_entropy,
    negative_labels,
    negative_learning_loss,
    resolve_target_images,
    reverse_ce,
    select_source_checkpoint,
    set_trainable,
    source_loss,
    source_train_epoch,
    symmetric_ce,
    tent_step,
)
from segcal.estimation import ConfidenceBaseline, ECEEstimator
from segcal.models import ClassMapping

LOG1E4 = -math.log(1e-4)


class Toy(nn.Module):
    """A tiny conv segmenter with BatchNorm: ``encoder`` then ``head``; 4 classes."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Sequential(
            nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, c, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


def toy_model(seed: int = 0) -> Toy:
    torch.manual_seed(seed)
    return Toy().eval()


def toy_images(n: int = 6, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (16, 16, 3), dtype=np.uint8) for _ in range(n)]


def run_toy(tmp_path: Path, method: str = "calsfda", **kw):
    kw.setdefault("rounds", 2)
    kw.setdefault("epochs_per_round", 2)
    est = kw.pop("estimator", ConfidenceBaseline("maxprob"))
    return adapt(
        kw.pop("model", toy_model()), kw.pop("images", toy_images()), est, method=method,
        lr=kw.pop("lr", 1e-2), num_classes=4, out_dir=kw.pop("out_dir", tmp_path / method),
        progress=False, batch_size=2, **kw,
    )


# --------------------------------------------------------------------------- losses
def test_class_weights_softmax_of_inverse_threshold():
    w = class_weights([0.5, 0.0, 1.0])
    ref = torch.softmax(torch.tensor([2.0, 100.0, 1.0], dtype=torch.float64), 0).float()
    assert torch.allclose(w, ref)
    assert math.isclose(float(w.sum()), 1.0, rel_tol=1e-6)


def test_symmetric_ce_hand_value():
    logits = torch.zeros(1, 2, 1, 1)
    y = torch.zeros(1, 1, 1, dtype=torch.long)
    # p = (0.5, 0.5): CE = log 2; RCE = -(0.5 log 1 + 0.5 log 1e-4) = 0.5 * 9.2103
    expected = 0.1 * math.log(2) + 1.0 * 0.5 * LOG1E4
    assert math.isclose(float(symmetric_ce(logits, y)), expected, rel_tol=1e-5)


def test_symmetric_ce_class_weights_and_ignore():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 4)
    y = torch.randint(0, 3, (2, 4, 4))
    y[0, 0, :] = 255
    w = torch.tensor([0.2, 0.5, 0.3])
    ce_w = F.cross_entropy(logits, y, weight=w, ignore_index=255)
    got = symmetric_ce(logits, y, w, alpha=1.0, beta=0.0)
    assert torch.allclose(got, ce_w)
    # all pixels unlabelled: 0 with a gradient path
    allign = torch.full_like(y, 255)
    z = symmetric_ce(logits.requires_grad_(), allign)
    assert float(z.detach()) == 0.0
    z.backward()


def test_rce_clamp_bounds():
    y = torch.zeros(1, 2, 2, dtype=torch.long)
    right = torch.zeros(1, 3, 2, 2)
    right[:, 0] = 50.0
    wrong = torch.zeros(1, 3, 2, 2)
    wrong[:, 1] = 50.0
    assert float(reverse_ce(right, y)) < 1e-5  # only the 1e-7 probability floor
    # a confident wrong prediction costs -log(1e-4), not infinity (one-hot clamped to [1e-4, 1])
    assert math.isclose(float(reverse_ce(wrong, y)), LOG1E4, rel_tol=1e-4)


def test_negative_labels_seeded_rank_and_never_prediction():
    c = 12
    # class k has the k-th highest probability: the class index equals its rank
    probs = torch.softmax(torch.arange(c, 0, -1).float().view(1, c, 1, 1).expand(2, c, 8, 8), 1)
    a = negative_labels(probs, torch.Generator().manual_seed(3))
    b = negative_labels(probs, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert int(a.min()) >= c // 2 - 3 and int(a.max()) <= c // 2 + 3
    assert len(torch.unique(a)) > 3  # the ±3 jitter is used
    # 3 classes: rank 1 + U{-3..3} clamped to [1, 2] -> never the argmax (rank 0)
    p3 = torch.softmax(torch.randn(1, 3, 16, 16), 1)
    neg = negative_labels(p3, torch.Generator().manual_seed(0))
    assert not bool((neg == p3.argmax(1)).any())


def test_negative_learning_loss_value():
    logits = torch.log(torch.tensor([0.7, 0.2, 0.1])).view(1, 3, 1, 1)
    neg = torch.tensor([[[1]]])
    assert math.isclose(float(negative_learning_loss(logits, neg)), -math.log(0.8), rel_tol=1e-5)


def test_entropy_term_softmax_once():
    c = 5
    uniform = torch.zeros(1, c, 2, 2)
    assert math.isclose(float(entropy_term(uniform)), 1.0, rel_tol=1e-6)
    logits = torch.tensor([4.0, 1.0, 0.0, -1.0, -2.0]).view(1, c, 1, 1)
    p = torch.softmax(logits, 1)
    h = float(-(p * p.log()).sum() / math.log(c))
    assert math.isclose(float(entropy_term(logits)), h**4, rel_tol=1e-5)
    # the reference's double softmax (log_softmax of probabilities) gives a different value
    lp2 = F.log_softmax(p, 1)
    h2 = float(-(lp2.exp() * lp2).sum() / math.log(c))
    assert not math.isclose(h**4, h2**4, rel_tol=1e-2)


def test_calsfda_loss_parts():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 6, 6, requires_grad=True)
    y = torch.randint(0, 4, (2, 6, 6))
    loss, parts = CalSFDALoss(class_weights([0.6, 0.7, 0.8, 0.9]), eta=0.5)(logits, y, torch.Generator().manual_seed(0))
    assert set(parts) == {"sce", "nl", "entropy", "total"}
    assert math.isclose(parts["total"], parts["sce"] + parts["nl"] + 0.5 * parts["entropy"], rel_tol=1e-5)
    loss.backward()
    assert logits.grad is not None
    _, off = CalSFDALoss(None)(logits, y)
    assert "entropy" not in off  # eta = 0 by default


# --------------------------------------------------------------------------- BN / TENT
def test_set_trainable_bn_only():
    m = toy_model()
    params = set_trainable(m, "bn")
    assert {id(p) for p in params} == {id(p) for p in bn_parameters(m)}
    assert all(p.requires_grad == (id(p) in {id(q) for q in params}) for p in m.parameters())
    rest = set_trainable(m, "all", ("encoder",))
    names = {n for n, p in m.named_parameters() if p.requires_grad}
    assert names and not any(n.startswith("encoder.") for n in names) and len(rest) == len(names)


def test_bn_warmup_epoch_changes_only_bn(tmp_path):
    m = toy_model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    res = run_toy(tmp_path, model=m, rounds=1, epochs_per_round=1, warmup_affine=True)  # only the warm-up
    assert [e["phase"] for e in res.epochs] == ["warmup"]
    after = load_checkpoint(res.checkpoints[0])["state_dict"]
    bn_names = {n for n, mod in m.named_modules() if isinstance(mod, nn.BatchNorm2d)}
    for k, v in before.items():
        is_bn = k.rsplit(".", 1)[0] in bn_names
        if k.endswith("num_batches_tracked"):
            continue
        if is_bn:
            assert not torch.equal(v, after[k]), f"{k} should change"
        else:
            assert torch.equal(v, after[k]), f"{k} is not a BN tensor and must not change"
    assert torch.equal(m.state_dict()["head.0.weight"], before["head.0.weight"])  # the input model untouched


def test_encoder_frozen_after_warmup(tmp_path):
    m = toy_model()
    res = run_toy(tmp_path, model=m, rounds=1, epochs_per_round=3)
    sd = [load_checkpoint(p)["state_dict"] for p in res.checkpoints]
    assert torch.equal(sd[0]["encoder.0.weight"], m.state_dict()["encoder.0.weight"])
    for k in ("encoder.0.weight", "encoder.1.weight", "encoder.1.bias"):  # frozen after epoch 0
        assert torch.equal(sd[0][k], sd[2][k]), k
    assert not torch.equal(sd[0]["head.0.weight"], sd[2]["head.0.weight"])  # the rest trains
    assert not torch.equal(sd[0]["encoder.1.running_mean"], sd[2]["encoder.1.running_mean"])  # BN in train mode


def test_tent_lowers_entropy_on_shifted_batch():
    m = toy_model()
    x = torch.from_numpy(np.stack(toy_images(4))).permute(0, 3, 1, 2).float() / 255.0 * 3.0 + 1.0  # shifted
    conv_before = m.head[0].weight.clone()
    bn_train_mode(m)
    opt = torch.optim.SGD(set_trainable(m, "bn"), lr=0.05, momentum=0.9)
    first = tent_step(m, x, opt)
    for _ in range(15):
        tent_step(m, x, opt)
    with torch.no_grad():
        last = float(mean_entropy(m(x)))
    assert last < first - 1e-3
    assert torch.equal(m.head[0].weight, conv_before)


# --------------------------------------------------------------------------- the loop
def test_adapt_quick_end_to_end(tmp_path):
    res = run_toy(tmp_path, quick=True)
    assert len(res.checkpoints) == 2 and all(p.is_file() for p in res.checkpoints)
    log = json.loads(res.log_path.read_text())
    assert len(log["images"]) == 4  # quick: at most 4 images
    assert [e["phase"] for e in log["epochs"]] == ["warmup", "main"]
    r0 = log["rounds"][0]
    assert math.isclose(r0["prop"], 0.15) and math.isclose(r0["local_prop"], 0.1)
    assert len(r0["coverage_per_class"]) == 4 and len(r0["thresholds"]) == 4
    assert all(e["estimated_ece"] is not None and e["coverage_per_class"] for e in log["epochs"])
    best = min(log["epochs"], key=lambda e: e["estimated_ece"])
    assert res.selected_epoch == best["epoch"] == log["selected_epoch"]
    assert res.selection_rule == "argmin estimated target ECE"
    ck = load_checkpoint(res.selected_checkpoint)
    for k, v in res.model.state_dict().items():
        assert torch.equal(v, ck["state_dict"][k])


def test_calsfda_selects_argmin_and_schedule(tmp_path):
    res = run_toy(tmp_path)
    log = json.loads(res.log_path.read_text())
    assert [e["epoch"] for e in log["epochs"]] == [0, 1, 2, 3]
    assert [r["round"] for r in log["rounds"]] == [0, 1]
    assert math.isclose(log["rounds"][1]["prop"], 0.2) and math.isclose(log["rounds"][1]["local_prop"], 0.15)
    ests = [e["estimated_ece"] for e in log["epochs"]]
    assert res.selected_epoch == int(np.argmin(ests))


@pytest.mark.parametrize("method", ["tent", "selftrain"])
def test_baselines_select_last_epoch(tmp_path, method):
    res = run_toy(tmp_path, method, selftrain_threshold=0.3)
    assert res.selected_epoch == 3 and res.selection_rule == "last epoch"
    assert all(e["estimated_ece"] is not None for e in res.epochs)  # logged for the baselines too
    if method == "selftrain":
        assert res.epochs[0]["coverage"] > 0
    else:
        assert res.epochs[0]["coverage"] is None


def test_baseline_without_estimator(tmp_path):
    res = run_toy(tmp_path, "tent", estimator=None, rounds=1, epochs_per_round=2)
    assert res.selected_epoch == 1 and res.epochs[0]["estimated_ece"] is None


def test_seeded_runs_are_identical(tmp_path):
    a = run_toy(tmp_path, out_dir=tmp_path / "a", rounds=1)
    b = run_toy(tmp_path, out_dir=tmp_path / "b", rounds=1)
    assert [e["estimated_ece"] for e in a.epochs] == [e["estimated_ece"] for e in b.epochs]


@pytest.mark.parametrize("resume_at", [0, 1])
def test_resume_continues_epoch_count(tmp_path, resume_at):
    full = run_toy(tmp_path, out_dir=tmp_path / "full")
    part = tmp_path / "part"
    run_toy(tmp_path, out_dir=part, rounds=1, epochs_per_round=2)  # epochs 0, 1 of the same schedule
    res = run_toy(tmp_path, out_dir=part, resume=part / f"epoch_{resume_at:03d}.pt")
    assert [e["epoch"] for e in res.epochs] == [0, 1, 2, 3]
    assert len(json.loads((part / "adapt_log.json").read_text())["epochs"]) == 4
    fa, pa = load_checkpoint(full.checkpoints[-1])["state_dict"], load_checkpoint(part / "epoch_003.pt")["state_dict"]
    for k in fa:
        assert torch.allclose(fa[k].float(), pa[k].float(), atol=1e-5), k
    for a, b in zip(full.epochs, res.epochs, strict=True):
        assert math.isclose(a["estimated_ece"], b["estimated_ece"], rel_tol=1e-4, abs_tol=1e-6)


def test_resume_errors(tmp_path):
    res = run_toy(tmp_path, rounds=1, epochs_per_round=2)
    with pytest.raises(ValueError, match="nothing left"):
        run_toy(tmp_path, rounds=1, epochs_per_round=2, resume=res.checkpoints[-1], out_dir=tmp_path / "x")
    with pytest.raises(ValueError, match="method"):
        run_toy(tmp_path, "tent", resume=res.checkpoints[0], out_dir=tmp_path / "y")


def test_features_estimator(tmp_path):
    est = ECEEstimator(8, meta={"layer": "encoder"}, grid=(4, 4))
    res = run_toy(tmp_path, estimator=est, quick=True)
    assert all(0 < e["estimated_ece"] < 1 for e in res.epochs)
    other = ECEEstimator(8, meta={"layer": "encoder", "model": "espnet-camvid"}, grid=(4, 4))
    with pytest.warns(UserWarning, match="trained on 'espnet-camvid' features"):
        run_toy(tmp_path, estimator=other, quick=True, out_dir=tmp_path / "other")
    bad = ECEEstimator(8, meta={"layer": "decoder"})
    with pytest.raises(ValueError, match="not a sub-module"):
        run_toy(tmp_path, estimator=bad, quick=True, out_dir=tmp_path / "bad")


def test_estimate_target_ece_matches_logged_estimates(tmp_path):
    """Scoring a checkpoint afterwards gives the per-image estimates the loop logged for it."""
    from segcal.models.registry import default_preprocess

    imgs = toy_images()
    for name, est in (("maxprob", ConfidenceBaseline("maxprob")),
                      ("features", ECEEstimator(8, meta={"layer": "encoder"}, grid=(4, 4)))):
        res = run_toy(tmp_path, images=imgs, estimator=est, rounds=1, epochs_per_round=2, out_dir=tmp_path / name)
        batches = [torch.cat([default_preprocess(a) for a in imgs[i:i + 2]], 0) for i in range(0, len(imgs), 2)]
        for ck_path, entry in zip(res.checkpoints, res.epochs, strict=True):
            m = toy_model()
            m.load_state_dict(load_checkpoint(ck_path)["state_dict"])
            m.train()
            got = estimate_target_ece(m, batches, est, num_classes=4)
            np.testing.assert_allclose(got, entry["estimated_ece_per_image"], rtol=1e-6, atol=1e-7)
            assert m.training  # mode restored
            assert not any(mod._forward_hooks for mod in m.modules())  # features hook removed
    with pytest.raises(ValueError, match="estimator"):
        estimate_target_ece(toy_model(), batches, None, num_classes=4)


def test_warmup_without_bn_stats_pass(tmp_path):
    """``bn_stats_pass=False``: no reset/re-estimation, only the BN-affine epoch (momentum updates)."""
    def tracked(path):
        sd = load_checkpoint(path)["state_dict"]
        return int(sd["encoder.1.num_batches_tracked"])

    with_pass = run_toy(tmp_path, rounds=1, epochs_per_round=1, out_dir=tmp_path / "a", warmup_affine=True)
    without = run_toy(tmp_path, rounds=1, epochs_per_round=1, out_dir=tmp_path / "b", bn_stats_pass=False,
                      warmup_affine=True)
    assert tracked(with_pass.checkpoints[0]) == 3 + 3  # reset, 3 statistics batches, 3 training batches
    assert tracked(without.checkpoints[0]) == 3  # only the 3 training batches of the warm-up epoch
    assert json.loads(without.log_path.read_text())["config"]["bn_stats_pass"] is False


def test_warmup_stats_only_is_adabn(tmp_path):
    """``warmup_affine=False``: epoch 0 = the statistics pass alone (AdaBN); no parameter moves."""
    from segcal.estimation import warmup_bn
    from segcal.models.registry import default_preprocess

    imgs = toy_images()
    res = run_toy(tmp_path, images=imgs, rounds=1, epochs_per_round=2)  # the default
    e0, e1 = res.epochs
    assert e0["phase"] == "warmup" and e0["loss"] is None and e0["batch_losses"] == []
    assert e1["phase"] == "main" and e1["loss"] is not None
    ref = toy_model()
    warmup_bn(ref, (torch.cat([default_preprocess(a) for a in imgs[i:i + 2]], 0) for i in range(0, len(imgs), 2)))
    got = load_checkpoint(res.checkpoints[0])["state_dict"]
    for k, v in ref.state_dict().items():
        assert torch.equal(v, got[k]), k  # parameters untouched, statistics = AdaBN's
    with pytest.raises(ValueError, match="nothing for the calsfda warm-up"):
        run_toy(tmp_path, out_dir=tmp_path / "x", warmup_affine=False, bn_stats_pass=False)


def test_cli_no_bn_reset_reaches_adapt(tmp_path, monkeypatch):
    import segcal.cli.adapt_cmd as adapt_cmd
    from segcal.cli import main

    seen = {}

    def fake_adapt(*a, **kw):
        seen.update(kw)
        raise RuntimeError("stop here")

    monkeypatch.setattr(adapt_cmd, "adapt", fake_adapt)
    monkeypatch.setattr(adapt_cmd, "create_model", lambda *a, **k: object())  # no weights needed
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    from PIL import Image

    Image.fromarray(toy_images(1)[0]).save(img_dir / "a.png")
    for flag, reset, affine in (([], True, False), (["--no-bn-reset", "--warmup", "stats+affine"], False, True),
                                (["--warmup", "stats+affine"], True, True)):
        seen.clear()
        with pytest.raises(RuntimeError, match="stop here"):
            main(["adapt", "--model", "espnet-camvid", "--target", str(img_dir), "--estimator", "maxprob",
                  "--out", str(tmp_path / "o"), *flag])
        assert seen["bn_stats_pass"] is reset and seen["warmup_affine"] is affine


# --------------------------------------------------------------------------- errors
def test_error_estimator_class_count(tmp_path):
    est = ECEEstimator(5 + 3, input_kind="logits", num_classes=5)
    with pytest.raises(ValueError, match=r"trained for 5 classes.*4 outputs"):
        run_toy(tmp_path, estimator=est, quick=True)
    # with a mapping the estimator must match the mapped classes
    mapping = ClassMapping([[0, 1], [2, 3]], 4)
    est2 = ECEEstimator(2 + 3, input_kind="logits", num_classes=2)
    run_toy(tmp_path, estimator=est2, quick=True, class_mapping=mapping, out_dir=tmp_path / "ok")
    with pytest.raises(ValueError, match=r"trained for 5 classes.*mapping's 2 target classes"):
        run_toy(tmp_path, estimator=est, quick=True, class_mapping=mapping)
    with pytest.raises(ValueError, match="mapping expects 3 source classes"):
        run_toy(tmp_path, estimator=est2, quick=True, class_mapping=ClassMapping([[0], [1, 2]], 3))


def test_error_model_output_mismatch(tmp_path):
    with pytest.raises(ValueError, match="num_classes=5"):
        adapt(toy_model(), toy_images(2), ConfidenceBaseline(), num_classes=5, out_dir=tmp_path, quick=True,
              progress=False)


def test_error_unknown_method_and_missing_estimator(tmp_path):
    with pytest.raises(ValueError, match="method: expected one of calsfda, tent, selftrain"):
        run_toy(tmp_path, "fancy")
    with pytest.raises(ValueError, match="needs an ECE estimator"):
        run_toy(tmp_path, estimator=None)


def test_error_empty_target_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="no images"):
        resolve_target_images(tmp_path / "empty")
    with pytest.raises(FileNotFoundError):
        resolve_target_images(tmp_path / "missing")


# --------------------------------------------------------------------------- no target label is opened
def _fake_camvid(root: Path, n: int = 3) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        (root / "camvid" / split).mkdir(parents=True)
        (root / "camvid" / f"{split}annot").mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / "camvid" / split / f"f{i}.png")
            Image.fromarray(rng.integers(0, 4, (16, 16), dtype=np.uint8)).save(root / "camvid" / f"{split}annot" / f"f{i}.png")
    return root


class _Recorder:
    def __init__(self, monkeypatch):
        import PIL.Image

        self.paths: list[str] = []
        rec = self.paths
        orig_open, orig_pil, orig_npload, orig_iterdir = builtins.open, PIL.Image.open, np.load, pathlib.Path.iterdir

        def _open(file, *a, **k):
            rec.append(str(file))
            return orig_open(file, *a, **k)

        def _pil(fp, *a, **k):
            rec.append(str(getattr(fp, "name", fp)))
            return orig_pil(fp, *a, **k)

        def _npload(file, *a, **k):
            rec.append(str(getattr(file, "name", file)))
            return orig_npload(file, *a, **k)

        def _iterdir(self_):
            rec.append(str(self_))
            return orig_iterdir(self_)

        monkeypatch.setattr(builtins, "open", _open)
        monkeypatch.setattr(PIL.Image, "open", _pil)
        monkeypatch.setattr(np, "load", _npload)
        monkeypatch.setattr(pathlib.Path, "iterdir", _iterdir)

    def label_paths(self) -> list[str]:
        return [p for p in self.paths if "annot" in p]


def test_no_target_label_file_is_opened(tmp_path, monkeypatch):
    root = _fake_camvid(tmp_path / "data")
    rec = _Recorder(monkeypatch)
    res = adapt(toy_model(), "camvid:train", ConfidenceBaseline(), num_classes=4, out_dir=tmp_path / "out",
                rounds=1, epochs_per_round=2, progress=False, data_root=root, lr=1e-2)
    # resume reloads the round's pseudo-labels with np.load: still no label file
    adapt(toy_model(), "camvid:train", ConfidenceBaseline(), num_classes=4, out_dir=tmp_path / "out",
          rounds=2, epochs_per_round=2, progress=False, data_root=root, lr=1e-2, resume=res.checkpoints[0])
    assert any(p.endswith(".png") and "/train/" in p for p in rec.paths), "images should be read"
    assert rec.label_paths() == []


# --------------------------------------------------------------------------- source side
def _labelled(n: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 16, 16, generator=g)
    y = (x[:, 0] > 0.5).long() + 2 * (x[:, 1] > 0.5).long()  # learnable from the pixel colour
    y[:, 0, :] = 255
    return [(x[i : i + 2], y[i : i + 2]) for i in range(0, n, 2)]


def test_source_loss_is_ce_plus_alpha_class_ece():
    (x, y), _ = _labelled()
    logits = toy_model()(x)
    ce = F.cross_entropy(logits, y, ignore_index=255)
    l0, _ = source_loss(logits, y, alpha=0.0)
    assert torch.allclose(l0, ce)
    _, p1 = source_loss(logits, y, alpha=1.0)
    assert p1["class_ece"] > 0 and math.isclose(p1["total"], p1["ce"] + p1["class_ece"], rel_tol=1e-5)


def test_source_training_and_selection(tmp_path):
    m = toy_model()
    data = _labelled(8)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    paths = []
    torch.save(m.state_dict(), tmp_path / "ck0.pt")
    paths.append(tmp_path / "ck0.pt")
    first = source_train_epoch(m, data, opt)
    for i in range(1, 4):
        last = source_train_epoch(m, data, opt)
        torch.save(m.state_dict(), tmp_path / f"ck{i}.pt")
        paths.append(tmp_path / f"ck{i}.pt")
    assert last["total"] < first["total"]
    idx, eces = select_source_checkpoint(paths, toy_model(), data)
    assert idx == int(np.argmin(eces)) and len(eces) == 4
    m.load_state_dict(torch.load(paths[idx], weights_only=True))
    assert math.isclose(evaluate_source_ece(m, data), eces[idx], rel_tol=1e-6)


# --------------------------------------------------------------------------- CLI
def test_cli_errors(tmp_path, capsys):
    from segcal.cli import main

    (tmp_path / "empty").mkdir()
    assert main(["adapt", "--model", "espnet-camvid", "--target", str(tmp_path / "empty"), "--estimator",
                 "maxprob", "--out", str(tmp_path / "o")]) == 2
    assert "no images" in capsys.readouterr().err
    assert main(["adapt", "--model", "espnet-camvid", "--target", str(tmp_path), "--method", "fancy",
                 "--out", str(tmp_path / "o")]) == 2
    assert "unknown method 'fancy'" in capsys.readouterr().err
    assert main(["adapt", "--model", "espnet-camvid", "--target", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "--estimator is required" in capsys.readouterr().err


def _camvid_or_skip() -> Path:
    from segcal.data import data_root

    root = data_root(required=False)
    if root is None or not (Path(root) / "camvid" / "train").is_dir() or not (Path(root) / "espnet").is_dir():
        pytest.skip("CamVid / ESPNet weights not found under the data root (../shared/data or SEGCAL_DATA)")
    return Path(root)


@pytest.mark.realdata
@pytest.mark.slow
def test_cli_quick_real_camvid(tmp_path, monkeypatch, capsys):
    _camvid_or_skip()
    from segcal.cli import main

    rec = _Recorder(monkeypatch)
    out = tmp_path / "adapt"
    rc = main(["adapt", "--model", "espnet-camvid", "--target", "camvid:train", "--estimator", "maxprob",
               "--method", "calsfda", "--out", str(out), "--quick", "--max-images", "2", "--no-progress",
               "--corruption", "gaussian_noise", "--severity", "3"])
    assert rc == 0, capsys.readouterr().err
    log = json.loads((out / "adapt_log.json").read_text())
    assert len(log["images"]) == 2 and len(log["epochs"]) == 2
    assert len(log["rounds"][0]["coverage_per_class"]) == 12
    assert log["rounds"][0]["coverage_per_class"][11] == 0.0  # void is never a pseudo-label
    assert (out / f"epoch_{log['selected_epoch']:03d}.pt").is_file()
    assert "selected (argmin estimated target ECE)" in capsys.readouterr().out
    assert rec.label_paths() == []
    # a logits estimator for another class count is refused with a clear message
    est = ECEEstimator(11 + 3, input_kind="logits", num_classes=11)
    est.save(tmp_path / "est11.pt")
    rc = main(["adapt", "--model", "espnet-camvid", "--target", "camvid:train", "--estimator",
               str(tmp_path / "est11.pt"), "--out", str(tmp_path / "o2"), "--quick", "--max-images", "2",
               "--no-progress"])
    assert rc == 2 and "trained for 11 classes" in capsys.readouterr().err


def test_images_of_two_sizes_with_batches_refused_before_training(tmp_path):
    """One process, --batch-size > 1, images of two sizes: an InputError naming the sizes before
    anything is written (it was a raw torch.cat error mid-epoch); batch size 1 runs."""
    from segcal.errors import InputError

    imgs = toy_images(3)
    imgs[1] = np.zeros((20, 16, 3), dtype=np.uint8)
    with pytest.raises(InputError, match=r"different sizes .*batch_size=2"):
        run_toy(tmp_path, "tent", images=imgs, out_dir=tmp_path / "two")
    assert not (tmp_path / "two" / "epoch_000.pt").exists()
    res = adapt(toy_model(), imgs, ConfidenceBaseline("maxprob"), method="tent", lr=1e-2, num_classes=4,
                out_dir=tmp_path / "one", progress=False, batch_size=1, rounds=1, epochs_per_round=1)
    assert res.checkpoints
