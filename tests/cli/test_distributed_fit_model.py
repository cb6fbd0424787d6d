"""``segcal fit --model`` under two local gloo processes (issue 20).

``fit --model`` needs a model registered in the process, so its two ranks are
``torch.multiprocessing`` workers that set torchrun's ``env://`` variables, register a tiny
random-weight model and call :func:`segcal.cli.main` (the command line's own code path, world()
included). The saved calibrator
must equal one process's to 1e-6 (observed: bitwise), the JSON's split, pixel counts and
before/after metrics to 1e-12, rank 1 prints nothing; with unequal shards (1 + 2 batches of
images of two sizes, 4 + 2 images) and a rank without images (1 + 0).
"""

from __future__ import annotations

import contextlib
import io
import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from ranks import assert_same_fit, free_port
from segcal.cli import main
from segcal.models import register_model, unregister_model

C = 4
MODEL = "tiny-fit-dist"


class TinyNet(torch.nn.Module):
    """A 3x3 conv with seeded random weights: 3 -> C classes (deterministic on the CPU)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = torch.nn.Conv2d(3, C, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 2)
            self.conv.bias.copy_(torch.randn(C, generator=g))

    def forward(self, x):
        return self.conv(x)


def _register() -> None:
    register_model(MODEL, TinyNet, num_classes=C, ignore_index=255, overwrite=True)


def _images(tmp_path, n: int):
    """``n`` RGB images (the 8th of another size, so a batch breaks at a size change) and PNG labels."""
    rng = np.random.default_rng(1)
    imgs, labs = tmp_path / "imgs", tmp_path / "labels"
    imgs.mkdir()
    labs.mkdir()
    for i in range(n):
        h, w = (10, 12) if i != 7 else (8, 10)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(imgs / f"s{i}.png")
        y = rng.integers(0, C, (h, w)).astype(np.uint8)
        y[rng.random((h, w)) < 0.05] = 255
        Image.fromarray(y).save(labs / f"s{i}.png")
    return imgs, labs


def _worker(rank: int, port: int, args: list[str], out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    _register()
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(args)
    torch.save({"code": code, "stdout": stdout.getvalue()}, f"{out}.rank{rank}.pt")


# ------------------------------------------------------------------------------ fit --model
@pytest.mark.slow
@pytest.mark.parametrize("n, val, extra", [
    # fit: batches s0 s1 s3 s5 | s6 | s7, 1 + 2 batches = 4 + 2 images (balanced by images; a split
    # by images, 3 + 3, would change the batches and the order of the perturbed copies);
    # validation: s2 s4, one batch (1 + 0)
    (8, "0.25", ["--perturb", "gaussian_noise:2,contrast:3", "--optimizer", "adam", "--max-iter", "20"]),
    (2, "0.5", ["--optimizer", "lbfgs"]),  # 1 fit + 1 validation image: rank 1 holds none
])
def test_fit_model_two_ranks_equal_one_process(tmp_path, n, val, extra):
    imgs, labs = _images(tmp_path, n)
    args = ["fit", "--model", MODEL, "--images", str(imgs), "--labels", str(labs), "--ignore-index", "255",
            "--method", "ts", "--val-fraction", val, "--batch-size", "4", "--no-progress", *extra]
    _register()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            assert main([*args, "--out", str(tmp_path / "one.pt"), "--json", str(tmp_path / "one.json")]) == 0
    finally:
        unregister_model(MODEL)
    two = [*args, "--out", str(tmp_path / "two.pt"), "--json", str(tmp_path / "two.json")]
    mp.spawn(_worker, args=(free_port(), two, str(tmp_path / "run")), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"run.rank{r}.pt") for r in range(2)]
    assert [r["code"] for r in ranks] == [0, 0]
    assert "fitting ts on" in ranks[0]["stdout"] and ranks[1]["stdout"] == ""
    assert_same_fit(tmp_path)
