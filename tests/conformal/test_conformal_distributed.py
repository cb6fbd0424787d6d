"""``segcal conformal fit`` and ``segcal conformal eval`` under two local gloo processes (the
``env://`` variables ``torchrun`` sets): every rank builds the loss-table rows of its block of the
stems, the rows are gathered in stem order, and rank 0 writes the same files as one process, byte
for byte; with unequal shards (3 + 2 images) and a rank without images (1 + 0)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ranks import two_ranks
from segcal.cli import main

C = 4


@pytest.mark.parametrize("n", [5, 1])
def test_two_ranks_fit_and_eval_like_one_process(tmp_path, n) -> None:
    rng = np.random.default_rng(10 + n)
    pred, lab = tmp_path / "pred", tmp_path / "labels"
    pred.mkdir()
    lab.mkdir()
    for i in range(n):
        shape = (9 + i, 11)
        z = (rng.normal(size=(C, *shape)) * 3).astype(np.float16)
        y = np.where(rng.random(shape) < 0.6, z.argmax(0), rng.integers(0, C, shape)).astype(np.uint8)
        y[rng.random(shape) < 0.05] = 255
        np.save(pred / f"img_{i:03d}.npy", z)
        Image.fromarray(y).save(lab / f"img_{i:03d}.png")
    common = ["--pred", str(pred), "--labels", str(lab), "--no-progress"]
    fit = ["conformal", "fit", *common, "--ignore-index", "255", "--risk", "miscoverage", "--alpha", "0.9"]
    assert main([*fit, "--out", str(tmp_path / "one.json")]) == 0
    ranks = two_ranks([*fit, "--out", str(tmp_path / "two.json")])
    assert [r.returncode for r in ranks] == [0, 0], [r.stderr for r in ranks]
    assert ranks[1].stdout == "" and "lambda = " in ranks[0].stdout
    assert (tmp_path / "two.json").read_bytes() == (tmp_path / "one.json").read_bytes()
    if n == 1:  # the rank without images is shown by fit; eval shares its code (CI time)
        return
    ev = ["conformal", "eval", *common, "--result", str(tmp_path / "one.json")]
    assert main([*ev, "--json", str(tmp_path / "e1.json")]) == 0
    ranks = two_ranks([*ev, "--json", str(tmp_path / "e2.json")])
    assert [r.returncode for r in ranks] == [0, 0], [r.stderr for r in ranks]
    assert ranks[1].stdout == ""
    assert (tmp_path / "e2.json").read_bytes() == (tmp_path / "e1.json").read_bytes()
