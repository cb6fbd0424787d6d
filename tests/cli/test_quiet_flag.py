"""``--quiet`` / ``-q`` is the same switch as ``--no-progress`` on every command that shows progress."""

from __future__ import annotations

import pytest

from segcal.cli.app import build_parser

COMMANDS = {
    "eval": ["--pred", "p", "--labels", "l"],
    "fit": ["--pred", "p", "--labels", "l", "--method", "ts", "--out", "c.pt"],
    "predict": ["--model", "m", "--images", "i", "--out", "o"],
    "adapt": ["--model", "m", "--target", "t", "--out", "o"],
    "apply": ["--pred", "p", "--calibrator", "c.pt", "--out", "o"],
    "estimate": ["--pred", "p", "--estimator", "maxprob"],
    "pseudolabel": ["--pred", "p", "--out", "o"],
    "conformal fit": ["--pred", "p", "--labels", "l", "--alpha", "0.1", "--out", "c.json"],
    "conformal apply": ["--pred", "p", "--result", "c.json", "--out", "o"],
}


@pytest.mark.parametrize("flag", ["--quiet", "-q", "--no-progress"])
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_quiet_silences_progress(command, flag):
    parser = build_parser()
    words = command.split()
    assert parser.parse_args([*words, *COMMANDS[command]]).no_progress is False
    assert parser.parse_args([*words, *COMMANDS[command], flag]).no_progress is True


def test_quiet_leaves_stderr_empty(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from segcal.cli import main

    pred, lab = tmp_path / "pred", tmp_path / "labels"
    pred.mkdir()
    lab.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        np.save(pred / f"im{i}.npy", (rng.normal(size=(3, 10, 12)) * 2).astype(np.float32))
        Image.fromarray(rng.integers(0, 3, (10, 12)).astype(np.uint8)).save(lab / f"im{i}.png")
    base = {"eval": ["eval", "--pred", str(pred), "--labels", str(lab)],
            "fit": ["fit", "--pred", str(pred), "--labels", str(lab), "--method", "ts", "--out",
                    str(tmp_path / "ts.pt")]}
    for name, argv in base.items():
        assert main(argv) == 0
        assert capsys.readouterr().err.strip(), f"{name}: no progress on stderr without --quiet"
        assert main([*argv, "--quiet"]) == 0
        assert capsys.readouterr().err == "", f"{name} --quiet wrote to stderr"
