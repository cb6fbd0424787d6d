"""The command line's one error layer, its start-up and its refusal to overwrite inputs (issue 16).

Each test here fails on a8985da (exit code 1 or a raw traceback, torch imported to build the
parser, a pseudo-label --out equal to an input accepted) and passes now.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from segcal.cli import main
from segcal.errors import EXIT_INPUT, InputError, MissingDependencyError
from segcal.io import write_prediction


@pytest.fixture()
def folders(tmp_path):
    rng = np.random.default_rng(0)
    pred, lab = tmp_path / "pred", tmp_path / "lab"
    lab.mkdir()
    for i in range(4):
        y = rng.integers(0, 3, (12, 16))
        logits = rng.normal(size=(3, 12, 16)) + 3 * np.eye(3)[y].transpose(2, 0, 1)
        write_prediction(pred / f"im{i}.npy", logits)
        np.save(lab / f"im{i}.npy", y)
    return pred, lab


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# --------------------------------------------------------------------------- start-up
def test_building_the_parser_imports_no_torch():
    code = ("import sys, segcal, segcal.cli; segcal.cli.build_parser(); "
            "print(sorted(m for m in ('torch', 'numpy', 'segcal.calibrators', 'segcal.cli.eval_cmd') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_version_and_help_run_without_torch():
    code = ("import sys\nfrom segcal.cli import main\n"
            "for argv in (['--version'], ['eval', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit as e:\n        assert e.code == 0, e.code\n"
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)


def test_segcal_load_is_lazy_and_still_works(tmp_path):
    import segcal

    assert "load" in dir(segcal)
    import segcal.calibrators as sc

    assert segcal.load is sc.load
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = segcal.nope


def test_help_shows_defaults(capsys):
    for cmd in ("pseudolabel", "estimate", "adapt", "predict"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "(default: " in text, cmd
    with pytest.raises(SystemExit):
        main(["pseudolabel", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 255)" in text and "(default: 0)" in text  # --ignore-value, --round


def test_adapt_parser_lists_the_loop_methods():
    from segcal.adaptation.loop import METHODS
    from segcal.cli.parsers import adapt

    assert adapt.METHODS == METHODS


# --------------------------------------------------------------------------- the error layer
def _raise_in(monkeypatch, exc):
    import segcal.cli.calibrators_cmd as mod

    def boom(args):
        raise exc

    monkeypatch.setattr(mod, "run", boom)


@pytest.mark.parametrize("exc, needle", [
    (InputError("--pred: x.npy has shape (3,)"), "x.npy has shape"),
    (FileNotFoundError(2, "No such file or directory", "/nowhere/a.npy"), "/nowhere/a.npy"),
    (PermissionError(13, "Permission denied", "/ro/out.npy"), "/ro/out.npy: Permission denied"),
    (OSError(28, "No space left on device", "/full/x.npy"), "No space left on device"),
    (IsADirectoryError(21, "Is a directory", "/d"), "Is a directory"),
    (EOFError("No data left in file"), "No data left in file"),
    (zipfile.BadZipFile("File is not a zip file"), "not a zip file"),
    (json.JSONDecodeError("Expecting value", "x", 0), "Expecting value"),
    (MissingDependencyError("isotonic calibration needs 'sklearn'; pip install 'segcal[isotonic]'"),
     "segcal[isotonic]"),
])
def test_reader_errors_are_one_line_and_exit_2(monkeypatch, capsys, exc, needle):
    _raise_in(monkeypatch, exc)
    assert main(["calibrators"]) == EXIT_INPUT
    err = capsys.readouterr().err
    assert err.startswith("segcal calibrators: error: ") and err.count("\n") == 1, err
    assert needle in err and "Traceback" not in err


def test_torch_unpickler_advice_is_never_printed(tmp_path, capsys):
    import pathlib

    import torch

    bad = tmp_path / "est.pt"
    torch.save({"format": pathlib.PurePosixPath("x")}, bad)  # a global the restricted loader refuses
    pred = tmp_path / "pred"
    write_prediction(pred / "a.npy", np.zeros((3, 4, 4), np.float32))
    assert main(["estimate", "--pred", str(pred), "--estimator", str(bad)]) == EXIT_INPUT
    err = capsys.readouterr().err
    assert "weights_only" not in err and str(bad) in err and err.count("\n") == 1, err


def test_missing_module_names_the_extra(monkeypatch, capsys):
    _raise_in(monkeypatch, ModuleNotFoundError("No module named 'sklearn'", name="sklearn"))
    assert main(["calibrators"]) == EXIT_INPUT
    assert "pip install 'segcal[isotonic]'" in capsys.readouterr().err


def test_bugs_keep_their_traceback(monkeypatch):
    _raise_in(monkeypatch, KeyError("a bug"))
    with pytest.raises(KeyError):
        main(["calibrators"])


def test_debug_reraises(monkeypatch):
    _raise_in(monkeypatch, InputError("refused"))
    with pytest.raises(InputError):
        main(["calibrators", "--debug"])
    with pytest.raises(InputError):
        main(["--debug", "calibrators"])
    monkeypatch.setenv("SEGCAL_DEBUG", "1")
    with pytest.raises(InputError):
        main(["calibrators"])


def test_cli_error_is_an_input_error():
    from segcal.cli import CLIError

    assert issubclass(CLIError, InputError) and issubclass(CLIError, ValueError)


def test_closed_pipe_exits_quietly(folders):
    """``segcal eval ... | head`` with the reader gone before the table is printed: no traceback,
    no "Exception ignored ... BrokenPipeError" (a8985da: exit 120 with that message)."""
    pred, lab = folders
    cmd = [sys.executable, "-m", "segcal", "eval", "--pred", str(pred), "--labels", str(lab), "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone long before the child (importing torch) writes
    err = proc.stderr.read().decode()
    rc = proc.wait(timeout=120)
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    assert rc == 1 and err == "", (rc, err)


# --------------------------------------------------------------------------- --out never an input
@pytest.mark.parametrize("which", ["pred", "labels", "inside_pred", "parent_of_labels"])
def test_pseudolabel_out_never_overwrites_an_input(folders, capsys, which):
    pred, lab = folders
    out = {"pred": pred, "labels": lab, "inside_pred": pred / "sub", "parent_of_labels": lab.parent}[which]
    before_p, before_l = _snapshot(pred), _snapshot(lab)
    rc = main(["pseudolabel", "--pred", str(pred), "--labels", str(lab), "--out", str(out), "--format", "npy"])
    assert rc == EXIT_INPUT
    err = capsys.readouterr().err
    assert "--out" in err and err.count("\n") == 1
    assert _snapshot(pred) == before_p and _snapshot(lab) == before_l


def test_pseudolabel_out_is_an_existing_file(folders, tmp_path, capsys):
    pred, _ = folders
    f = tmp_path / "file.txt"
    f.write_text("x")
    assert main(["pseudolabel", "--pred", str(pred), "--out", str(f)]) == EXIT_INPUT
    assert "is an existing file" in capsys.readouterr().err


def test_estimate_train_out_inside_an_input(folders, capsys):
    pred, lab = folders
    before = _snapshot(pred)
    for out in (pred / "est.pt", lab / "est.pt", pred):
        assert main(["estimate", "--train", "--pred", str(pred), "--labels", str(lab), "--out", str(out),
                     "--epochs", "1"]) == EXIT_INPUT
        assert "--out" in capsys.readouterr().err
    assert _snapshot(pred) == before


def test_adapt_out_equal_to_target(tmp_path, capsys):
    from PIL import Image

    img = tmp_path / "imgs"
    img.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img / "a.png")
    assert main(["adapt", "--model", "espnet-camvid", "--target", str(img), "--estimator", "maxprob",
                 "--out", str(img)]) == EXIT_INPUT
    assert "--out" in capsys.readouterr().err
    assert [p.name for p in img.iterdir()] == ["a.png"]


# --------------------------------------------------------------------------- input type
def test_probabilities_passed_as_logits_are_refused(tmp_path, capsys):
    rng = np.random.default_rng(1)
    pred = tmp_path / "pred"
    pred.mkdir()
    for i in range(2):
        z = rng.normal(size=(3, 6, 7))
        p = np.exp(z) / np.exp(z).sum(0)
        np.save(pred / f"im{i}.npy", p.astype(np.float32))
    assert main(["estimate", "--pred", str(pred), "--baseline", "maxprob"]) == EXIT_INPUT
    err = capsys.readouterr().err
    assert "--probabilities" in err and "im0.npy" in err
    assert main(["estimate", "--pred", str(pred), "--baseline", "maxprob", "--probabilities"]) == 0
    capsys.readouterr()
    assert main(["estimate", "--pred", str(pred), "--baseline", "maxprob", "--input-type", "probs"]) == 0
    capsys.readouterr()
    assert main(["estimate", "--pred", str(pred), "--baseline", "maxprob", "--probabilities",
                 "--input-type", "logits"]) == EXIT_INPUT
    assert "contradict" in capsys.readouterr().err


def test_predict_out_equal_to_images_or_labels(tmp_path, capsys):
    from PIL import Image

    img, lab = tmp_path / "imgs", tmp_path / "labs"
    img.mkdir()
    lab.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img / "a.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(lab / "a.png")
    for out in (img, lab, img / "preds"):
        assert main(["predict", "--model", "espnet-camvid", "--images", str(img), "--labels", str(lab),
                     "--out", str(out), "--no-progress"]) == EXIT_INPUT
        assert "--out" in capsys.readouterr().err
    assert [p.name for p in img.iterdir()] == ["a.png"] and [p.name for p in lab.iterdir()] == ["a.png"]


def test_json_summary_never_overwrites_an_input(folders, capsys):
    pred, _ = folders
    (pred / "segcal.json").write_text('{"format": "segcal-predictions", "version": 1, "input_type": "logits"}')
    before = _snapshot(pred)
    for argv in (["estimate", "--pred", str(pred), "--baseline", "maxprob", "--json", str(pred / "segcal.json")],
                 ["pseudolabel", "--pred", str(pred), "--out", str(pred.parent / "pl"), "--json",
                  str(pred / "segcal.json")]):
        assert main(argv) == EXIT_INPUT
        assert "--json" in capsys.readouterr().err
    assert _snapshot(pred) == before


def test_estimator_with_nan_parameters_is_refused_at_load(tmp_path, capsys):
    import torch

    from segcal.estimation import ECEEstimator

    est = ECEEstimator(6, input_kind="logits", num_classes=3)
    with torch.no_grad():
        next(iter(est.parameters())).fill_(float("nan"))
    path = tmp_path / "nan_est.pt"
    est.save(path)
    with pytest.raises(InputError, match="NaN or infinite"):
        ECEEstimator.load(path)
    pred = tmp_path / "pred"
    write_prediction(pred / "a.npy", np.random.default_rng(0).normal(size=(3, 4, 4)))
    assert main(["estimate", "--pred", str(pred), "--estimator", str(path)]) == EXIT_INPUT
    assert "nan_est.pt" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["truncated", "missing_key", "nan_weight"])
def test_damaged_adaptation_checkpoint_is_refused(tmp_path, damage):
    import torch

    from segcal.adaptation import CHECKPOINT_FORMAT, load_checkpoint

    payload = {"format": CHECKPOINT_FORMAT, "method": "tent", "epoch": 0,
               "state_dict": {"w": torch.ones(2)}}
    path = tmp_path / "epoch_000.pt"
    if damage == "missing_key":
        del payload["state_dict"]
    if damage == "nan_weight":
        payload["state_dict"]["w"][0] = float("nan")
    torch.save(payload, path)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(InputError, match=r"epoch_000\.pt"):
        load_checkpoint(path)
