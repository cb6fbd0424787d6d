"""``segcal eval --conformal-*`` under two local gloo processes (the ``env://`` variables ``torchrun``
sets): every rank counts its block of the stems, the loss-table rows are gathered in stem order,
and rank 0 writes the same threshold file as one process (and as ``segcal conformal fit``), byte
for byte; with unequal shards (3 + 2 images) and a rank without images (1 + 0)."""

from __future__ import annotations

import pytest

from folders import logit_folder
from ranks import two_ranks
from segcal.cli import main

C = 4


@pytest.mark.parametrize("n", [5, 1])
def test_two_ranks_write_the_file_of_one_process(tmp_path, n) -> None:
    pred, lab = logit_folder(tmp_path, n, n, num_classes=C)
    common = ["--pred", str(pred), "--labels", str(lab), "--ignore-index", "255", "--no-progress"]
    flags = ["--conformal-risk", "fnr", "--conformal-class", "1", "--conformal-alpha", "0.9"]  # feasible for n >= 1
    assert main(["eval", *common, *flags, "--conformal-out", str(tmp_path / "one.json")]) == 0
    assert main(["conformal", "fit", *common, "--risk", "fnr", "--class", "1", "--alpha", "0.9",
                 "--out", str(tmp_path / "fit.json")]) == 0
    ranks = two_ranks(["eval", *common, *flags, "--conformal-out", str(tmp_path / "two.json")])
    assert [r.returncode for r in ranks] == [0, 0], [r.stderr for r in ranks]
    assert ranks[1].stdout == "" and "conformal: lambda = " in ranks[0].stdout
    one = (tmp_path / "one.json").read_bytes()
    assert (tmp_path / "two.json").read_bytes() == one == (tmp_path / "fit.json").read_bytes()
