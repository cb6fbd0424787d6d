"""``segcal apply / estimate / pseudolabel / predict / fit`` under two local gloo processes (issue 20).

Two ``python -m segcal`` processes with the ``env://`` variables ``torchrun`` sets (each process's
own exit code and output), or ``torch.multiprocessing`` workers for the library call that needs a
model registered in the process (``predict_folder``). Outputs and JSON must equal one process's
run on the same folder: files bitwise, metrics to 1e-12, fitted parameters to 1e-6; with unequal
shards (3 + 2 images) and a rank without images (1 + 0).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from folders import logit_folder
from ranks import free_port, two_ranks
from segcal.calibrators import create
from segcal.calibrators import load as load_calibrator
from segcal.cli import main
from segcal.io.predictions import read_folder_meta
from segcal.models import register_model, unregister_model
from segcal.pipeline.distributed import world
from segcal.pipeline.predict import predict_folder

C = 4


def _same_tree(a, b) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        if name.endswith(".npy"):
            x, y = np.load(a / name), np.load(b / name)
            assert x.dtype == y.dtype and np.array_equal(x, y), name
        elif name.endswith(".png"):
            assert np.array_equal(np.asarray(Image.open(a / name)), np.asarray(Image.open(b / name))), name


def _check_rank_outputs(ranks) -> None:
    assert [r.returncode for r in ranks] == [0, 0], [r.stderr for r in ranks]
    assert ranks[1].stdout == "", ranks[1].stdout  # rank 0 alone prints


# ------------------------------------------------------------------------------------ apply
@pytest.mark.slow
@pytest.mark.parametrize("n", [5, 1])
def test_apply_two_ranks_write_the_same_folder(tmp_path, n):
    pred, lab = logit_folder(tmp_path, n)
    cal = create("ts").fit(str(pred), str(lab), ignore_index=255)
    cal.save(tmp_path / "ts.pt")
    args = ["apply", "--pred", str(pred), "--calibrator", str(tmp_path / "ts.pt"), "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    ranks = two_ranks([*args, "--out", str(tmp_path / "two")])
    _check_rank_outputs(ranks)
    assert f"wrote {n} calibrated prediction(s)" in ranks[0].stdout
    _same_tree(tmp_path / "one", tmp_path / "two")
    one, two = read_folder_meta(tmp_path / "one"), read_folder_meta(tmp_path / "two")
    assert two == one and two["complete"] is True


@pytest.mark.slow
def test_apply_a_failing_rank_stops_both_and_leaves_the_folder_incomplete(tmp_path):
    pred, _ = logit_folder(tmp_path, 5)
    create("ts").fit(str(pred), str(tmp_path / "labels"), ignore_index=255).save(tmp_path / "ts.pt")
    (pred / "img_004.npy").write_bytes(b"not a numpy file")  # in rank 1's block (img_003..004)
    ranks = two_ranks(["apply", "--pred", str(pred), "--calibrator", str(tmp_path / "ts.pt"),
                        "--out", str(tmp_path / "two"), "--no-progress"])
    assert [r.returncode for r in ranks] == [2, 2], [r.stderr for r in ranks]
    assert "img_004.npy" in ranks[1].stderr and "rank 1 of 2 stopped" in ranks[0].stderr
    assert read_folder_meta(tmp_path / "two")["complete"] is False


# --------------------------------------------------------------------------------- estimate
@pytest.mark.slow
def test_estimate_train_and_baseline_two_ranks_equal_one_process(tmp_path):
    pred, lab = logit_folder(tmp_path, 5)
    train = ["estimate", "--train", "--pred", str(pred), "--labels", str(lab), "--ignore-index", "255",
             "--epochs", "5"]
    assert main([*train, "--out", str(tmp_path / "one.pt")]) == 0
    ranks = two_ranks([*train, "--out", str(tmp_path / "two.pt")])
    assert [r.returncode for r in ranks] == [0, 0], [r.stderr for r in ranks]
    a = torch.load(tmp_path / "one.pt", weights_only=False)
    b = torch.load(tmp_path / "two.pt", weights_only=False)
    sa, sb = a["state_dict"], b["state_dict"]
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], rtol=0, atol=1e-6, msg=k)
    est = ["estimate", "--pred", str(pred), "--estimator", str(tmp_path / "one.pt")]
    assert main([*est, "--json", str(tmp_path / "one.json")]) == 0
    ranks = two_ranks([*est, "--json", str(tmp_path / "two.json")])
    _check_rank_outputs(ranks)
    one, two = json.loads((tmp_path / "one.json").read_text()), json.loads((tmp_path / "two.json").read_text())
    assert list(two["per_image"]) == list(one["per_image"]) == [f"img_{i:03d}" for i in range(5)]
    np.testing.assert_allclose(list(two["per_image"].values()), list(one["per_image"].values()), rtol=0,
                               atol=1e-12)
    assert two["mean"] == pytest.approx(one["mean"], abs=1e-12) and two["n_images"] == 5


# ------------------------------------------------------------------------------ pseudolabel
@pytest.mark.slow
def test_pseudolabel_two_ranks_equal_one_process(tmp_path):
    pred, lab = logit_folder(tmp_path, 5)
    args = ["pseudolabel", "--pred", str(pred), "--labels", str(lab), "--label-ignore", "255",
            "--estimator", "maxprob", "--round", "1"]
    assert main([*args, "--out", str(tmp_path / "one"), "--json", str(tmp_path / "one.json")]) == 0
    ranks = two_ranks([*args, "--out", str(tmp_path / "two"), "--json", str(tmp_path / "two.json")])
    _check_rank_outputs(ranks)
    _same_tree(tmp_path / "one", tmp_path / "two")
    one, two = json.loads((tmp_path / "one.json").read_text()), json.loads((tmp_path / "two.json").read_text())
    assert two.keys() == one.keys()
    for key, want in one.items():
        if isinstance(want, float):
            assert two[key] == pytest.approx(want, abs=1e-12), key
        else:
            assert two[key] == want, key


# ---------------------------------------------------------------------------------- predict
class Tiny(torch.nn.Module):
    """3 classes: logits = a fixed 1x1 conv of the [0, 1] image (deterministic)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 1, bias=True)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(3).view(3, 3, 1, 1) * 4)
            self.conv.bias.copy_(torch.tensor([-2.0, -1.0, 0.0]))

    def forward(self, x):
        return self.conv(x)


def _images(tmp_path, n: int):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (8, 12 if i != 2 else 10, 3), dtype=np.uint8)).save(imgs / f"s{i}.png")
    return imgs


def _predict_worker(rank: int, port: int, imgs: str, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    register_model("tiny-dist", Tiny, num_classes=3, class_names=["r", "g", "b"], ignore_index=255)
    with world() as w:
        res = predict_folder("tiny-dist", imgs, out, device="cpu", progress=False, batch_size=2,
                             distributed=w.distributed)
        torch.save({"stems": res.stems}, f"{out}.rank{rank}.pt")


@pytest.mark.slow
@pytest.mark.parametrize("n", [5, 1])
def test_predict_folder_two_ranks_write_the_same_folder(tmp_path, n):
    imgs = _images(tmp_path, n)
    register_model("tiny-dist", Tiny, num_classes=3, class_names=["r", "g", "b"], ignore_index=255)
    try:
        one = predict_folder("tiny-dist", imgs, tmp_path / "one", device="cpu", progress=False, batch_size=2)
    finally:
        unregister_model("tiny-dist")
    mp.spawn(_predict_worker, args=(free_port(), str(imgs), str(tmp_path / "two")), nprocs=2, join=True)
    _same_tree(tmp_path / "one", tmp_path / "two")
    assert read_folder_meta(tmp_path / "two") == read_folder_meta(tmp_path / "one")
    assert read_folder_meta(tmp_path / "two")["n_images"] == n
    for r in range(2):
        assert torch.load(tmp_path / f"two.rank{r}.pt")["stems"] == one.stems == [f"s{i}" for i in range(n)]


# -------------------------------------------------------------------------------------- fit
@pytest.mark.slow
@pytest.mark.parametrize("method", ["ts", "cmsop"])
def test_fit_two_ranks_equal_one_process(tmp_path, method):
    pred, lab = logit_folder(tmp_path, 6)
    args = ["fit", "--pred", str(pred), "--labels", str(lab), "--ignore-index", "255", "--method", method,
            "--val-fraction", "0.34", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "one.pt"), "--json", str(tmp_path / "one.json")]) == 0
    ranks = two_ranks([*args, "--out", str(tmp_path / "two.pt"), "--json", str(tmp_path / "two.json")])
    _check_rank_outputs(ranks)
    a, b = load_calibrator(tmp_path / "one.pt"), load_calibrator(tmp_path / "two.pt")
    for k, v in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[k], v, rtol=0, atol=1e-6, msg=k)
    one, two = json.loads((tmp_path / "one.json").read_text()), json.loads((tmp_path / "two.json").read_text())
    assert two["fit_info"]["split"] == one["fit_info"]["split"]
    assert two["fit_info"]["n_pixels"] == one["fit_info"]["n_pixels"]
    for key, ba in one["metrics"].items():
        for side in ("before", "after"):
            assert two["metrics"][key][side] == pytest.approx(ba[side], abs=1e-12), (key, side)
