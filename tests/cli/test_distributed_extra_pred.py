"""``segcal fit --pred ... --extra-pred`` under two local gloo processes (issue 20).

Two ``python -m segcal`` processes with torchrun's ``env://`` variables. The fit's data are
``--pred``'s images then each extra folder's, in stem order, and every rank reads its contiguous
block of that list: the saved calibrator must equal one process's to 1e-6 (observed: bitwise),
the JSON's split, pixel counts and before/after metrics to 1e-12, rank 1 prints nothing. With 3 fit
images and 2 extra folders the 9 (folder, image) pairs split 5 + 4, rank 0's block crossing from
``--pred`` into the first extra folder.
"""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
from PIL import Image

from ranks import assert_same_fit, two_ranks
from segcal.cli import main

C = 4


def _pred_folder(root, labels, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    root.mkdir()
    for i in range(n):
        shape = (10 + i, 12)
        z = (rng.normal(size=(C, *shape)) * 3).astype(np.float16)
        np.save(root / f"img_{i:03d}.npy", z)
        if seed == 0:
            y = np.where(rng.random(shape) < 0.6, z.argmax(0), rng.integers(0, C, shape)).astype(np.uint8)
            y[rng.random(shape) < 0.05] = 255
            Image.fromarray(y).save(labels / f"img_{i:03d}.png")


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adam"])  # Adam replays the one-process steps: any other order fails
def test_fit_extra_pred_two_ranks_equal_one_process(tmp_path, optimizer):
    labels = tmp_path / "labels"
    labels.mkdir()
    _pred_folder(tmp_path / "pred", labels, 5, seed=0)
    _pred_folder(tmp_path / "noisy", labels, 5, seed=1)
    _pred_folder(tmp_path / "blur", labels, 5, seed=2)
    args = ["fit", "--pred", str(tmp_path / "pred"), "--labels", str(labels), "--ignore-index", "255",
            "--extra-pred", str(tmp_path / "noisy"), "--extra-pred", str(tmp_path / "blur"),
            "--method", "ts", "--val-fraction", "0.4", "--optimizer", optimizer, "--no-progress"]
    if optimizer == "adam":
        args += ["--max-iter", "40"]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main([*args, "--out", str(tmp_path / "one.pt"), "--json", str(tmp_path / "one.json")]) == 0
    ranks = two_ranks([*args, "--out", str(tmp_path / "two.pt"), "--json", str(tmp_path / "two.json")])
    assert [r.returncode for r in ranks] == [0, 0], [r.stderr for r in ranks]
    assert "(+ 2 extra folder(s))" in ranks[0].stdout and ranks[1].stdout == ""
    assert_same_fit(tmp_path)
    one = json.loads((tmp_path / "one.json").read_text())
    assert one["fit_info"]["extra_pred"] == [str(tmp_path / "noisy"), str(tmp_path / "blur")]
