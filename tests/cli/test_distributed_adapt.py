"""``segcal adapt`` under two local gloo processes (issue 20): the one-process run, to float rounding.

The ranks are ``torch.multiprocessing`` workers that set torchrun's ``env://`` variables, register
a tiny random-weight model with BatchNorm (``encoder`` conv-BN-ReLU, ``head`` conv-BN-ReLU-conv)
and call :func:`segcal.cli.main` (the command line's own code path, ``world()`` included). One
spawn runs every two-rank case in turn (a fresh port each), to keep the file's time down:

* the synchronised BatchNorm alone (:func:`segcal.adaptation.sync_bn.synced_batchnorm`): two ranks
  holding 2 + 1 and 1 + 0 rows of two batches vs one ``nn.BatchNorm2d`` on the whole batch, with
  ``momentum=0.1`` and ``None``: outputs, input and affine gradients, running statistics;
* ``calsfda`` (BN-affine warm-up, 2 rounds, entropy term on), ``tent`` and ``selftrain`` on 3-5
  images with batch sizes that leave rank 1 without an image in some batch and give unequal
  slices (2 + 1): every epoch's checkpoint (parameters and BN buffers) to 1e-6, ``adapt_log.json``
  (floats to 1e-6, the selected epoch exactly), the pseudo-labels of every round bitwise; rank 1
  prints nothing;
* ``--resume`` on two ranks from a two-rank run's epoch 1 equals one process's full run;
* bad input (an estimator for another class count; images of two sizes with ``--batch-size 2``;
  a model that cannot run an empty batch when a batch leaves a rank without an image): exit code
  2 on both ranks.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image
from torch import nn

from ranks import free_port
from segcal.adaptation import load_checkpoint
from segcal.adaptation.sync_bn import synced_batchnorm
from segcal.cli import main
from segcal.estimation import ECEEstimator
from segcal.models import register_model, unregister_model
from segcal.pipeline.distributed import shard_bounds, world

C = 4
MODEL = "tiny-adapt-dist"
NOEMPTY = "tiny-adapt-noempty"
TOL = 1e-6
HANG_S = 300


class TinyBN(nn.Module):
    """conv-BN-ReLU encoder and conv-BN-ReLU-conv head, seeded random weights, C classes."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.encoder = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.head = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, C, 1))
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


class NoEmpty(TinyBN):
    """TinyBN that loops over the images of a batch and stacks them: fails on an empty batch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(torch.stack(list(x.unbind(0))))


def _register() -> None:
    register_model(MODEL, TinyBN, num_classes=C, overwrite=True)
    register_model(NOEMPTY, NoEmpty, num_classes=C, overwrite=True)


def _images(folder: Path, n: int, seed: int, odd: int | None = None) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for i in range(n):
        h, w = (8, 10) if i == odd else (12, 14)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"t{i}.png")
    return folder


def _adapt_args(images: Path, method: str, batch: int, *extra: str, model: str = MODEL) -> list[str]:
    return ["adapt", "--model", model, "--target", str(images), "--method", method, "--batch-size", str(batch),
            "--lr", "0.05", "--no-progress", *extra]


#: name -> (images folder name, adapt arguments without --out); batches per epoch in the comments
CASES = {
    # 3 images, batches of 2 and 1: slices 1 + 1 and 1 + 0 (rank 1 holds no image of one batch)
    "calsfda": ("three", "calsfda", 2, ["--estimator", "maxprob", "--rounds", "2", "--epochs", "1",
                                         "--warmup", "stats+affine", "--eta", "0.5"]),
    # 5 images, batches of 3 and 2: slices 2 + 1 (unequal) and 1 + 1
    "tent": ("five", "tent", 3, ["--estimator", "entropy", "--rounds", "1", "--epochs", "2"]),
    # 4 images, batches of 3 and 1: slices 2 + 1 and 1 + 0
    "selftrain": ("four", "selftrain", 3, ["--estimator", "maxprob", "--rounds", "2", "--epochs", "1"]),
}
FOLDERS = {"three": 3, "four": 4, "five": 5}


# ----------------------------------------------------------------------------- the workers
def _bn_reference() -> nn.BatchNorm2d:
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(5)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    return bn


def _bn_batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(3, 5, 4, 6, generator=g) * 3 + 2, torch.randn(1, 5, 4, 6, generator=g)]


def _bn_loss_weights(x: torch.Tensor) -> torch.Tensor:
    return torch.arange(x.numel(), dtype=torch.float32).reshape(x.shape).sin() * 0.1  # gradients of order 1


def _bn_case(rank: int) -> dict:
    """Two ranks' rows of each batch through the synced BN: outputs, grads, state."""
    out = {}
    for momentum in (0.1, None):
        bn = _bn_reference()
        bn.momentum = momentum
        bn.train()
        steps = []
        with synced_batchnorm(bn):
            for x in _bn_batches():
                s, e = shard_bounds(len(x), rank, 2)
                xi = x[s:e].clone().requires_grad_()
                y = bn(xi)
                bn.zero_grad()
                (y * _bn_loss_weights(x)[s:e]).sum().backward()
                g = torch.cat([bn.weight.grad, bn.bias.grad])
                torch.distributed.all_reduce(g)
                steps.append((y.detach(), xi.grad, g))
        out[str(momentum)] = (steps, {k: v.clone() for k, v in bn.state_dict().items()}, type(bn) is nn.BatchNorm2d)
    return out


def _worker(rank: int, ports: list[int], root: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    _register()
    base = Path(root)
    results: dict = {}
    port = iter(ports)
    os.environ["MASTER_PORT"] = str(next(port))
    with world() as _:
        results["bn"] = _bn_case(rank)

    def cli(name: str, args: list[str]) -> None:
        os.environ["MASTER_PORT"] = str(next(port))
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(args)
        results[name] = {"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()}

    for name, (folder, method, batch, extra) in CASES.items():
        cli(name, [*_adapt_args(base / folder, method, batch, *extra), "--out", str(base / f"two_{name}")])
    resume = _adapt_args(base / "three", "calsfda", 2, "--estimator", "maxprob", "--epochs", "2")
    cli("part", [*resume, "--rounds", "1", "--out", str(base / "two_resume")])
    cli("resume", [*resume, "--rounds", "2", "--out", str(base / "two_resume"),
                   "--resume", str(base / "two_resume" / "epoch_001.pt")])
    cli("bad_estimator", [*_adapt_args(base / "three", "calsfda", 2, "--estimator", str(base / "est5.pt")),
                          "--out", str(base / "bad1")])
    cli("bad_sizes", [*_adapt_args(base / "mixed", "tent", 2), "--out", str(base / "bad2")])
    cli("bad_empty", [*_adapt_args(base / "three", "tent", 2, model=NOEMPTY), "--out", str(base / "bad3")])
    torch.save(results, base / f"rank{rank}.pt")


# ----------------------------------------------------------------------------- the runs
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("adapt_dist")
    for name, n in FOLDERS.items():
        _images(base / name, n, seed=n)
    _images(base / "mixed", 3, seed=7, odd=1)
    ECEEstimator(5 + 3, input_kind="logits", num_classes=5).save(base / "est5.pt")
    _register()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            for name, (folder, method, batch, extra) in CASES.items():
                assert main([*_adapt_args(base / folder, method, batch, *extra), "--out", str(base / f"one_{name}")]) == 0
            full = _adapt_args(base / "three", "calsfda", 2, "--estimator", "maxprob", "--epochs", "2")
            assert main([*full, "--rounds", "2", "--out", str(base / "one_resume")]) == 0
    finally:
        unregister_model(MODEL)
    ctx = mp.spawn(_worker, args=([free_port() for _ in range(9)], str(base)), nprocs=2, join=False)
    deadline = time.monotonic() + HANG_S
    while not ctx.join(timeout=2):  # a worker's exception is raised here
        if time.monotonic() > deadline:  # a hang fails the test instead of blocking the suite
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the two-rank adapt runs did not finish in {HANG_S} s")
    return base, [torch.load(base / f"rank{r}.pt", weights_only=False) for r in range(2)]


def _same_log(a, b, path="log"):
    """Recursive equality, floats to TOL; ``seconds`` skipped, checkpoint paths by file name."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            if k == "seconds":
                continue
            if k == "selected_checkpoint":
                assert Path(a[k]).name == Path(b[k]).name, path
                continue
            _same_log(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same_log(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and not isinstance(b, bool):
        assert math.isclose(a, b, rel_tol=0, abs_tol=TOL), (path, a, b)
    else:
        assert a == b, (path, a, b)


def _compare(one: Path, two: Path) -> float:
    """Every checkpoint and pseudo-label file of ``two`` equals ``one``'s; the max abs difference."""
    log1, log2 = (json.loads((d / "adapt_log.json").read_text()) for d in (one, two))
    _same_log(log1, log2)
    worst = 0.0
    for e in log1["epochs"]:
        a = load_checkpoint(one / f"epoch_{e['epoch']:03d}.pt")
        b = load_checkpoint(two / f"epoch_{e['epoch']:03d}.pt")
        assert a["state_dict"].keys() == b["state_dict"].keys()
        for k, v in a["state_dict"].items():
            torch.testing.assert_close(b["state_dict"][k], v, rtol=0, atol=TOL, msg=k)
            worst = max(worst, float((b["state_dict"][k].double() - v.double()).abs().max()))
        assert torch.equal(a["rng"], b["rng"])
    for f in sorted(one.glob("pseudo_round*.npz")):
        za, zb = np.load(f), np.load(two / f.name)
        np.testing.assert_array_equal(za["labels"], zb["labels"])
        np.testing.assert_allclose(zb["weights"], za["weights"], rtol=0, atol=TOL)
    return worst


# ----------------------------------------------------------------------------- the tests
@pytest.mark.slow
def test_synced_batchnorm_equals_one_bn_on_the_whole_batch(runs):
    _, ranks = runs
    worst = 0.0
    for momentum in (0.1, None):
        bn = _bn_reference()
        bn.momentum = momentum
        bn.train()
        for j, x in enumerate(_bn_batches()):
            xi = x.clone().requires_grad_()
            y = bn(xi)
            bn.zero_grad()
            (y * _bn_loss_weights(x)).sum().backward()
            g = torch.cat([bn.weight.grad, bn.bias.grad])
            steps = [r["bn"][str(momentum)][0][j] for r in ranks]
            for got, want in ((torch.cat([s[0] for s in steps]), y.detach()),
                              (torch.cat([s[1] for s in steps]), xi.grad), (steps[0][2], g), (steps[1][2], g)):
                torch.testing.assert_close(got, want, rtol=0, atol=TOL)
                worst = max(worst, float((got - want).abs().max()))
        for r in ranks:
            state, plain = r["bn"][str(momentum)][1:]
            assert plain  # the class is swapped back on exit
            for k, v in bn.state_dict().items():
                torch.testing.assert_close(state[k], v, rtol=0, atol=TOL, msg=k)
    print(f"synced BN: max abs difference {worst:.3g}")


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_adapt_two_ranks_equal_one_process(runs, name):
    base, ranks = runs
    assert [r[name]["code"] for r in ranks] == [0, 0], [r[name]["stderr"][-2000:] for r in ranks]
    assert "selected (" in ranks[0][name]["stdout"] and ranks[1][name]["stdout"] == ""
    worst = _compare(base / f"one_{name}", base / f"two_{name}")
    print(f"{name}: max abs parameter/buffer difference {worst:.3g}")


@pytest.mark.slow
def test_resume_on_two_ranks_equals_one_full_run(runs):
    base, ranks = runs
    assert [r["part"]["code"] for r in ranks] == [0, 0] and [r["resume"]["code"] for r in ranks] == [0, 0]
    worst = _compare(base / "one_resume", base / "two_resume")
    print(f"resume: max abs parameter/buffer difference {worst:.3g}")


@pytest.mark.slow
def test_bad_input_exits_2_on_every_rank(runs):
    base, ranks = runs
    assert [r["bad_estimator"]["code"] for r in ranks] == [2, 2]
    assert all("trained for 5 classes" in r["bad_estimator"]["stderr"] for r in ranks)
    assert [r["bad_sizes"]["code"] for r in ranks] == [2, 2]
    assert all("different sizes" in r["bad_sizes"]["stderr"] for r in ranks)
    # 3 images in batches of 2: the batch of 1 leaves rank 1 without an image, and this model
    # cannot run an empty batch: refused on both ranks before any training (not a hang)
    assert [r["bad_empty"]["code"] for r in ranks] == [2, 2]
    assert all("cannot run on an empty batch" in r["bad_empty"]["stderr"] for r in ranks)
    assert not (base / "bad3" / "epoch_000.pt").exists()
