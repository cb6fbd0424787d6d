"""``segcal conformal fit`` and ``segcal conformal eval`` under two local gloo processes (the
``env://`` variables ``torchrun`` sets): every rank builds the loss-table rows of its block of the
stems, the rows are gathered in stem order, and rank 0 writes the same files as one process, byte
for byte; with unequal shards (3 + 2 images) and a rank without images (1 + 0)."""

from __future__ import annotations

import numpy as np
import pytest

from folders import logit_folder
from ranks import two_ranks
from segcal.cli import main

C = 4


@pytest.mark.parametrize("n", [5, 1])
def test_two_ranks_fit_and_eval_like_one_process(tmp_path, n) -> None:
    pred, lab = logit_folder(tmp_path, n, 10 + n, height=9, width=11)
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


@pytest.mark.parametrize("n", [5, 1])
def test_two_ranks_apply_like_one_process(tmp_path, n) -> None:
    """``conformal apply``: every rank writes its block of the files into rank 0's staged folder;
    the folder (files and manifest) equals one process's byte for byte (PNG), also when a rank has
    no file."""
    pred, lab = logit_folder(tmp_path, 5, 20 + n, height=9, width=11, void=0.0)
    cr = tmp_path / "cr.json"
    assert main(["conformal", "fit", "--pred", str(pred), "--labels", str(lab), "--risk", "miscoverage",
                 "--alpha", "0.2", "--no-progress", "--out", str(cr)]) == 0
    if n < 5:  # apply to the first n files only
        (tmp_path / "few").mkdir()
        for f in sorted(pred.iterdir())[:n]:
            (tmp_path / "few" / f.name).write_bytes(f.read_bytes())
        pred = tmp_path / "few"
    apply = ["conformal", "apply", "--pred", str(pred), "--result", str(cr), "--format", "png", "--no-progress"]
    assert main([*apply, "--out", str(tmp_path / "one")]) == 0
    ranks = two_ranks([*apply, "--out", str(tmp_path / "two")])
    assert [r.returncode for r in ranks] == [0, 0], [r.stderr for r in ranks]
    assert ranks[1].stdout == "" and f"of {n} files" in ranks[0].stdout
    one = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*") if p.is_file())
    two = sorted(p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("*") if p.is_file())
    assert one == two and len(one) > n
    for rel in one:
        assert (tmp_path / "two" / rel).read_bytes() == (tmp_path / "one" / rel).read_bytes(), rel
    assert not list(tmp_path.glob(".two.*")), "a staging folder was left behind"


def test_two_ranks_apply_error_on_one_rank_leaves_nothing(tmp_path) -> None:
    """A bad file in rank 1's block: both ranks exit 2 with one line naming it, no output folder
    and no staging folder is left."""
    pred, lab = logit_folder(tmp_path, 4, 31, height=9, width=11, void=0.0)
    cr = tmp_path / "cr.json"
    assert main(["conformal", "fit", "--pred", str(pred), "--labels", str(lab), "--risk", "miscoverage",
                 "--alpha", "0.2", "--no-progress", "--out", str(cr)]) == 0
    bad = np.load(pred / "img_003.npy")
    bad[0, 0, 0] = np.nan
    np.save(pred / "img_003.npy", bad)
    ranks = two_ranks(["conformal", "apply", "--pred", str(pred), "--result", str(cr), "--format", "png",
                       "--no-progress", "--out", str(tmp_path / "two")])
    assert [r.returncode for r in ranks] == [2, 2], [r.stderr for r in ranks]
    for r in ranks:
        assert "img_003" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "two").exists()
    assert not list(tmp_path.glob(".two.*")), "a staging folder was left behind"
