"""Trust audit, second part (session 27): outputs that disagreed with each other or with the
arguments, each case failing on the code before its fix.

* ``segcal eval --json``: ``iou_per_class`` (and Dice, class-wise and class-level ECE) held the
  ignore channel's computed 0.0 while the printed table said ``n/a``: the mean of the list was
  not the ``miou`` beside it. Now NaN (``null``) wherever the table says ``n/a``, in the JSON, the
  HTML report and the API (:func:`segcal.metrics.scores.compute_from_state`).

* ``segcal conformal fit`` / ``eval`` refused logits that are NaN at ignored pixels, which
  ``segcal eval --conformal-out`` accepts and turns into what is documented as the same result
  file. One rule now (:func:`segcal.validation.finite_where_valid`): numbers computed from the
  scores and labels without a calibrator (eval, eval --conformal-out, conformal fit / eval)
  accept NaN / inf where the label is ignored, as the metrics always did; where a calibrator
  runs (fit, apply, conformal --calibrator) or there are no labels (estimate, pseudolabel,
  conformal apply) every value must be finite, and the message says why.

* ``--ignore-index`` outside what the labels can hold (300 or -1 for uint8 PNG labels) was
  accepted silently; in ``segcal fit`` it was worse, a wrong calibrator with exit 0: the fit
  compared ``uint8 labels != 256`` in torch, which wraps 256 to 0, so every class-0 pixel was
  left out of the fit. Now a one-line warning on stderr names the flag, the value and the
  dtype's range, and the command runs with nothing ignored (what the value means for those
  labels); 255 with labels 0..11 gives no warning. ``validation.valid_labels`` is the exact
  comparison for the library.

* The class count of a folder's first file was found in two ways (``conformal`` through
  ``PredictionFolder.read``, which decodes the first label too; ``eval --class-names`` by its own
  ``read_prediction``), and ``conformal fit`` opened the folder again after its loss table for
  it. Now :attr:`segcal.io.PredictionFolder.num_classes` (the first file's header) and the table's
  own count (``LossTable.num_classes``).

* ``segcal export --example-shape`` that the network cannot take (another input channel count,
  a 3D shape for a 2D model): torch's RuntimeError from the export's tracing, as a traceback
  (exit 1). Now refused before the export, naming the flag and the model's error.

* Flags accepted and ignored: ``segcal estimate`` without ``--train`` took the training flags
  (``--labels``, ``--bins``, ``--ignore-index``, ``--epochs`` ...) and printed the same estimates
  as without them; ``--train`` took ``--json`` / ``--baseline`` and wrote nothing there;
  ``--features`` with a baseline or a logit estimator, and ``pseudolabel --label-ignore`` without
  ``--labels`` / ``--features`` without an estimator, were not read. Each is now refused naming
  the flag, before any file is read or written. ``segcal adapt`` took ``--severity`` without
  ``--corruption`` and ``--rounds`` / ``--epochs`` with ``--quick`` (which sets its own), and
  ``--max-images 0`` / a negative ``--eta``: refused too. ``segcal pseudolabel`` with an
  ``--ignore-value`` among the classes or a ``--local-prop`` outside [0, 1] exited 2 but left an
  empty ``--out`` behind, naming ``ignore_value`` / ``local_prop``: now refused before anything
  is read or created, naming the flag. ``segcal fit --pred`` took the model-run flags
  ``--batch-size`` / ``--perturb-seed`` / ``--data-root`` and, without a target, ``--target-method``
  / ``--target-max-images``, and read none of them: refused too.

* ``segcal conformal fit --risk fnr --class K`` (or ``eval --conformal-risk fnr``) with K the
  ``--ignore-index`` (CamVid's void 11): no pixel of K is ever valid, so every loss was 0 and the
  fit wrote a recall "guarantee" for the empty mask, exit 0. Refused now, naming the flag (and in
  the library, ``conformal.tables.check_risk``). ``conformal eval --ignore-index`` other than the
  fit's measured another loss than the guarantee's beside its alpha, silently: now a warning.

Every expected figure is recomputed with NumPy in the test (``metric_reference``).
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from metric_reference import reference_metrics, softmax
from segcal.calibrators import create
from segcal.cli import main
from segcal.conformal import LossTableBuilder, loss_table
from segcal.errors import InputError
from segcal.io import PredictionFolder
from segcal.models import register_model, unregister_model
from segcal.validation import ignore_index_note, valid_labels
from tiny_models import PixelConv


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def strict(path):
    def refuse(token):
        raise AssertionError(f"{path.name}: {token} is not JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


def save_folder(root, zs, ys):
    """``root/pred/s<i>.npy`` (scores ``zs[i]``) and ``root/labels/s<i>.npy`` (``ys[i]``); returns both folders."""
    pred, lab = root / "pred", root / "labels"
    pred.mkdir(parents=True)
    lab.mkdir()
    for i, (z, y) in enumerate(zip(zs, ys, strict=True)):
        np.save(pred / f"s{i}.npy", z)
        np.save(lab / f"s{i}.npy", y)
    return pred, lab


def void_channel_folder(root, n=3, c=4, shape=(6, 7), seed=0):
    """``n`` logit files of ``c`` channels whose last channel is void (its label value is the ignore
    index, ``c - 1``, as CamVid's 12-output ESPNet with void = 11); returns folders, logits, labels."""
    rng = np.random.default_rng(seed)
    zs, ys = [], []
    for _ in range(n):
        z = (2 * rng.normal(size=(c, *shape))).astype(np.float32)
        z[c - 1, :2] += 4  # the void channel is predicted somewhere: its computed IoU is 0, not NaN
        y = np.where(rng.random(shape) < 0.6, z.argmax(0), rng.integers(0, c, shape)).astype(np.uint8)
        y[-1] = c - 1
        zs.append(z)
        ys.append(y)
    return (*save_folder(root, zs, ys), np.stack(zs), np.stack(ys))


def test_eval_outputs_leave_the_ignore_channel_out_of_every_per_class_list(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    c = 4
    pred, lab, z, y = void_channel_folder(tmp_path, c=c)
    js, page = tmp_path / "m.json", tmp_path / "r.html"
    rc, out, err = run(capsys, "eval", "--pred", pred, "--labels", lab, "--ignore-index", c - 1, "-q",
                       "--json", js, "--html", page)
    assert rc == 0, err
    got = strict(js)
    ref = reference_metrics(softmax(z.astype(np.float64)), y, n_bins=15, ignore_index=c - 1)
    shown = dict(re.findall(r"(\d+):(\S+)", out.split("per-class IoU:", 1)[1].splitlines()[0]))
    means = {"iou_per_class": "miou", "dice_per_class": "mdice", "classwise_ece_per_class": "classwise_ece",
             "class_level_ece_per_class": "class_level_ece"}
    for key, mean in means.items():
        values = got[key]
        assert values[c - 1] is None, key  # was 0.0
        finite = [v for v in values if v is not None]
        assert len(finite) == c - 1 and np.mean(finite) == pytest.approx(got[mean], abs=1e-12), key
        np.testing.assert_allclose(np.array(values, dtype=np.float64), ref[key], atol=1e-6, rtol=0, err_msg=key)
    # the table says n/a exactly where the JSON says null
    assert [k for k, v in shown.items() if v == "n/a"] == [str(c - 1)]
    assert [int(k) for k, v in shown.items() if v == "n/a"] == [k for k, v in enumerate(got["iou_per_class"])
                                                               if v is None]
    assert all(row[c - 1] is None for row in got["image_iou_per_class"] + got["image_dice_per_class"])
    # the report's void row shows no IoU / Dice / class ECE
    void_row = re.search(rf"<tr class='void'><td>{c - 1}</td>(.*?)</tr>", page.read_text()).group(1)
    assert re.findall(r"<td>([^<]*)</td>", void_row)[-4:] == ["–"] * 4


def nan_at_ignored_folder(root, n=8, c=3, shape=(5, 6), seed=1, dtype=np.float32):
    """Logits that are NaN (and +inf) exactly where the label is 255; returns folders, logits, labels."""
    rng = np.random.default_rng(seed)
    zs, ys = [], []
    for i in range(n):
        z = (2 * rng.normal(size=(c, *shape))).astype(dtype)
        y = rng.integers(0, c, shape).astype(np.uint8)
        y[0, : 1 + i % 3] = 255
        z[:, y == 255] = np.nan
        z[0, y == 255] = np.inf
        zs.append(z)
        ys.append(y)
    return (*save_folder(root, zs, ys), np.stack(zs), np.stack(ys))


def reference_miscoverage(z, y, lam, ignore=255):
    """Per-image miscoverage of the sets {k : softmax_k >= 1 - lam} over the valid pixels (NumPy)."""
    losses = []
    for zi, yi in zip(z, y, strict=True):
        v = yi != ignore
        p = softmax(zi[:, v][None].astype(np.float64))[0]
        covered = p[yi[v], np.arange(v.sum())] >= 1.0 - lam
        losses.append(1.0 - covered.mean())
    return np.array(losses)


def test_conformal_fit_and_eval_accept_nan_at_ignored_pixels_as_eval_conformal_out_does(tmp_path, capsys):
    pred, lab, z, y = nan_at_ignored_folder(tmp_path)
    via_fit, via_eval, test_json = tmp_path / "fit.json", tmp_path / "eval.json", tmp_path / "t.json"
    rc, _, err = run(capsys, "conformal", "fit", "--pred", pred, "--labels", lab, "--ignore-index", 255, "-q",
                     "--alpha", "0.3", "--out", via_fit)
    assert rc == 0, err  # was exit 2: 'pred: s0: contains non-finite values'
    rc, _, err = run(capsys, "eval", "--pred", pred, "--labels", lab, "--ignore-index", 255, "-q",
                     "--conformal-alpha", "0.3", "--conformal-out", via_eval)
    assert rc == 0, err
    a, b = strict(via_fit), strict(via_eval)
    for key in ("lambda", "calibration_risk", "mean_size", "n_images", "method"):
        assert a[key] == b[key], key
    # the threshold is the one the finite valid pixels give (NumPy reference of the loss at lambda)
    lam = a["lambda"]
    assert a["calibration_risk"] == pytest.approx(reference_miscoverage(z, y, lam).mean(), abs=1e-12)
    rc, _, err = run(capsys, "conformal", "eval", "--result", via_fit, "--pred", pred, "--labels", lab, "-q",
                     "--json", test_json)
    assert rc == 0, err
    assert strict(test_json)["realised_risk"] == pytest.approx(reference_miscoverage(z, y, lam).mean(), abs=1e-12)


def test_nan_at_labelled_pixels_or_under_a_calibrator_is_refused_naming_the_file(tmp_path, capsys):
    pred, lab, z, _ = nan_at_ignored_folder(tmp_path, n=4)
    cal = tmp_path / "c.pt"
    clean = tmp_path / "clean"
    clean.mkdir()
    for i in range(4):
        np.save(clean / f"s{i}.npy", np.nan_to_num(z[i], nan=0.0, posinf=0.0))
    assert run(capsys, "fit", "--pred", clean, "--labels", lab, "--ignore-index", 255, "-q", "--method", "ts",
               "--out", cal)[0] == 0
    out = tmp_path / "r.json"
    rc, _, err = run(capsys, "conformal", "fit", "--pred", pred, "--labels", lab, "--ignore-index", 255, "-q",
                     "--alpha", "0.3", "--calibrator", cal, "--out", out)
    assert rc == 2 and "s0" in err and "nan_to_num" in err and err.count("\n") == 1, err
    assert not out.exists()
    bad = np.load(pred / "s2.npy")
    bad[1, 4, 5] = np.nan  # a labelled pixel
    np.save(pred / "s2.npy", bad)
    for argv in (["conformal", "fit", "--alpha", "0.3", "--out", out],
                 ["eval", "--conformal-alpha", "0.3", "--conformal-out", out]):
        rc, _, err = run(capsys, *argv, "--pred", pred, "--labels", lab, "--ignore-index", 255, "-q")
        assert rc == 2 and "s2" in err and "non-finite" in err and err.count("\n") == 1, (argv[0], err)
        assert not out.exists()


def png_label_folder(root, n=3, c=3, shape=(6, 8), seed=2):
    """Logits and uint8 PNG labels 0..c-1 (class 0 frequent: a wrapped ignore index 256 drops it)."""
    rng = np.random.default_rng(seed)
    pred, lab = root / "pred", root / "labels"
    pred.mkdir(parents=True)
    lab.mkdir()
    for i in range(n):
        z = (3 * rng.normal(size=(c, *shape))).astype(np.float32)
        y = np.where(rng.random(shape) < 0.7, z.argmax(0), 0).astype(np.uint8)
        np.save(pred / f"s{i}.npy", z)
        Image.fromarray(y).save(lab / f"s{i}.png")
    return pred, lab


@pytest.mark.parametrize("value", [256, 300, -1])
def test_an_ignore_index_the_labels_cannot_hold_is_named_and_changes_nothing(tmp_path, capsys, value):
    pred, lab = png_label_folder(tmp_path)
    got = {}
    for name, flags in (("none", []), ("given", ["--ignore-index", value])):
        js, cal, fit_js = tmp_path / f"{name}.json", tmp_path / f"{name}.pt", tmp_path / f"{name}-fit.json"
        rc, _, err = run(capsys, "eval", "--pred", pred, "--labels", lab, "-q", "--json", js, *flags)
        assert rc == 0, err
        warned = [line for line in err.splitlines() if "warning" in line]
        if name == "given":
            assert len(warned) == 1 and f"--ignore-index {value}" in warned[0] and "0..255" in warned[0]
            assert "uint8" in warned[0] and "s0.png" in warned[0], err
        else:
            assert not warned
        rc, _, err = run(capsys, "fit", "--pred", pred, "--labels", lab, "-q", "--method", "ts", "--out", cal,
                         "--json", fit_js, *flags)
        assert rc == 0, err
        got[name] = (strict(js), torch.load(cal, weights_only=True), strict(fit_js))
    (ev_a, cal_a, _), (ev_b, cal_b, _) = got["none"], got["given"]
    for key in ("ece", "nll", "n_pixels", "miou"):
        assert ev_a[key] == ev_b[key], key
    # the fitted temperature is the one of every pixel (was: class 0 left out with 256)
    ta = [v for k, v in cal_a["state_dict"].items() if "temperature" in k or "log_t" in k or "raw_t" in k]
    tb = [v for k, v in cal_b["state_dict"].items() if "temperature" in k or "log_t" in k or "raw_t" in k]
    assert ta and all(torch.equal(x, y) for x, y in zip(ta, tb, strict=True))


def test_the_usual_ignore_index_255_with_few_classes_gives_no_warning(tmp_path, capsys):
    pred, lab = png_label_folder(tmp_path)
    rc, _, err = run(capsys, "eval", "--pred", pred, "--labels", lab, "-q", "--ignore-index", 255)
    assert rc == 0 and "warning" not in err, err


def test_valid_labels_compares_exactly_for_every_dtype():
    y = torch.tensor([0, 44, 255], dtype=torch.uint8)
    assert bool((y != 256)[0]) is False  # torch wraps 256 to 0: what valid_labels avoids
    for ii in (256, 300, -1, -256):
        assert valid_labels(y, ii).all(), ii
        assert valid_labels(y.to(torch.int64), ii).all(), ii
        assert ignore_index_note(ii, np.uint8) is not None and "0..255" in ignore_index_note(ii, np.uint8)
    assert valid_labels(y, 255).tolist() == [True, True, False]
    assert valid_labels(torch.tensor([-1, 3]), -1).tolist() == [False, True]
    assert ignore_index_note(255, np.uint8) is None and ignore_index_note(-1, np.int64) is None
    assert ignore_index_note(70000, np.uint16) is not None and ignore_index_note(None, np.uint8) is None


def test_conformal_fit_reads_each_file_once_and_records_the_tables_class_count(tmp_path, capsys, monkeypatch):
    pred, lab, _, _ = void_channel_folder(tmp_path, n=4, c=5)
    reads = []
    real = PredictionFolder.read

    def counted(self, item):
        reads.append(item.stem)
        return real(self, item)

    monkeypatch.setattr(PredictionFolder, "read", counted)
    out = tmp_path / "r.json"
    rc, _, err = run(capsys, "conformal", "fit", "--pred", pred, "--labels", lab, "--ignore-index", 4, "-q",
                     "--alpha", "0.5", "--out", out)
    assert rc == 0, err
    assert sorted(reads) == ["s0", "s1", "s2", "s3"]  # was s0 twice: the class count re-read it
    assert strict(out)["meta"]["num_classes"] == 5
    reads.clear()
    rc, _, err = run(capsys, "eval", "--pred", pred, "--labels", lab, "-q", "--class-names", "a,b,c,d")
    assert rc == 2 and "4 names given" in err and "s0.npy holds 5 classes" in err, err
    assert reads == []  # the check reads the header only, before the evaluation


@pytest.mark.parametrize("shape, found", [("2,1,16,16", "channels"), ("2,3,4,16,16", "input")])
def test_export_refuses_an_example_shape_the_model_cannot_take(tmp_path, capsys, shape, found):
    g = torch.Generator().manual_seed(0)
    cal = tmp_path / "ts.pt"
    create("ts").fit(torch.randn(2, 3, 8, 8, generator=g), torch.randint(0, 3, (2, 8, 8), generator=g)).save(cal)
    register_model("tiny-export", PixelConv, num_classes=3)
    try:
        out = tmp_path / "m.pt2"
        rc, _, err = run(capsys, "export", "--model", "tiny-export", "--calibrator", cal, "--out", out,
                         "--example-shape", shape)
    finally:
        unregister_model("tiny-export")
    assert rc == 2 and err.startswith("segcal export: error: --example-shape") and found in err, err
    assert "Traceback" not in err and err.count("\n") == 1 and not out.exists()


@pytest.mark.parametrize("flags, named", [
    (["--labels", "{lab}"], "--labels"), (["--bins", "5"], "--bins"), (["--ignore-index", "255"], "--ignore-index"),
    (["--epochs", "3"], "--epochs"), (["--target", "class_level"], "--target"),
    (["--features", "{lab}"], "--features"),
])
def test_estimate_refuses_flags_it_would_not_read(tmp_path, capsys, flags, named):
    pred, lab = png_label_folder(tmp_path)
    flags = [f.format(lab=lab) for f in flags]
    js = tmp_path / "e.json"
    rc, out, err = run(capsys, "estimate", "--pred", pred, "--baseline", "maxprob", "-q", "--json", js, *flags)
    assert rc == 2 and err.split("error: ", 1)[1].startswith(named) and err.count("\n") == 1, err
    assert out == "" and not js.exists()


def test_estimate_train_refuses_json_and_pseudolabel_refuses_unread_flags(tmp_path, capsys):
    pred, lab = png_label_folder(tmp_path)
    est, js = tmp_path / "est.pt", tmp_path / "t.json"
    rc, _, err = run(capsys, "estimate", "--train", "--pred", pred, "--labels", lab, "--out", est, "--epochs", "1",
                     "--json", js, "-q")
    assert rc == 2 and "--json: not used by --train" in err and not est.exists() and not js.exists(), err
    for flags, named in ((["--label-ignore", "255"], "--label-ignore"), (["--features", lab], "--features")):
        out = tmp_path / "pl"
        rc, _, err = run(capsys, "pseudolabel", "--pred", pred, "--out", out, "-q", *flags)
        assert rc == 2 and err.split("error: ", 1)[1].startswith(named), err
        assert not out.exists()
    # what they are for still works
    assert run(capsys, "pseudolabel", "--pred", pred, "--out", tmp_path / "ok", "-q", "--labels", lab,
               "--label-ignore", 255)[0] == 0


@pytest.mark.parametrize("flags, named", [
    (["--severity", "5"], "--severity"), (["--quick", "--rounds", "5"], "--rounds"),
    (["--quick", "--epochs", "7"], "--epochs"), (["--max-images", "0"], "--max-images"),
    (["--eta", "-1"], "--eta"), (["--eta", "nan"], "--eta"),
])
def test_adapt_refuses_flags_it_would_not_honour(tmp_path, capsys, flags, named):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(imgs / "a.png")
    out = tmp_path / "out"
    rc, _, err = run(capsys, "adapt", "--model", "espnet-camvid", "--target", imgs, "--estimator", "maxprob",
                     "--out", out, *flags)
    assert rc == 2 and err.split("error: ", 1)[1].startswith(named) and err.count("\n") == 1, err
    assert not out.exists()


def test_an_fnr_class_that_is_the_ignore_index_is_refused(tmp_path, capsys):
    pred, lab, z, y = void_channel_folder(tmp_path, n=4, c=4)
    out = tmp_path / "r.json"
    for argv, named in ((["conformal", "fit", "--risk", "fnr", "--class", 3, "--alpha", "0.2", "--out", out],
                         "--class 3"),
                        (["eval", "--conformal-risk", "fnr", "--conformal-class", 3, "--conformal-alpha", "0.2",
                          "--conformal-out", out], "--conformal-class 3")):
        rc, _, err = run(capsys, *argv, "--pred", pred, "--labels", lab, "--ignore-index", 3, "-q")
        assert rc == 2 and err.split("error: ", 1)[1].startswith(named) and "ignore-index" in err, err
        assert not out.exists()
    with pytest.raises(InputError, match="class 3 is the ignore_index"):
        loss_table(zip(z, y, strict=True), "fnr", class_index=3, ignore_index=3, input_type="logits")
    with pytest.raises(InputError, match="class 3 is the ignore_index"):
        LossTableBuilder("fnr", class_index=3, ignore_index=3)
    # a labelled class is controlled as before
    assert run(capsys, "conformal", "fit", "--risk", "fnr", "--class", 1, "--alpha", "0.3", "--out", out,
               "--pred", pred, "--labels", lab, "--ignore-index", 3, "-q")[0] == 0


@pytest.mark.parametrize("flags, named", [
    (["--ignore-value", "1"], "--ignore-value 1"), (["--ignore-value", "70000"], "--ignore-value"),
    (["--local-prop", "-1"], "--local-prop"), (["--prop", "nan"], "--prop"), (["--prop", "0"], "--prop"),
    (["--subsample", "0"], "--subsample"), (["--round", "100"], "--round"), (["--round", "-1"], "--round"),
])
def test_pseudolabel_refuses_bad_settings_before_creating_its_out(tmp_path, capsys, flags, named):
    pred, _ = png_label_folder(tmp_path)
    out = tmp_path / "pl"
    rc, _, err = run(capsys, "pseudolabel", "--pred", pred, "--out", out, "-q", *flags)
    assert rc == 2 and err.split("error: ", 1)[1].startswith(named) and err.count("\n") == 1, err
    assert not out.exists()  # was an empty folder left behind (--ignore-value 1, --local-prop -1)


@pytest.mark.parametrize("flags, named", [
    (["--batch-size", "8"], "--batch-size"), (["--perturb-seed", "3"], "--perturb-seed"),
    (["--data-root", "."], "--data-root"), (["--target-method", "ece-estimate"], "--target-method"),
    (["--target-max-images", "5"], "--target-max-images"),
])
def test_fit_from_predictions_refuses_flags_it_would_not_read(tmp_path, capsys, flags, named):
    pred, lab = png_label_folder(tmp_path)
    cal = tmp_path / "c.pt"
    rc, _, err = run(capsys, "fit", "--pred", pred, "--labels", lab, "-q", "--method", "ts", "--out", cal, *flags)
    assert rc == 2 and err.split("error: ", 1)[1].startswith(named) and err.count("\n") == 1, err
    assert not cal.exists()


def test_conformal_eval_with_another_ignore_index_than_the_fit_warns(tmp_path, capsys):
    pred, lab, _, _ = void_channel_folder(tmp_path, n=4, c=4)
    res = tmp_path / "r.json"
    assert run(capsys, "conformal", "fit", "--pred", pred, "--labels", lab, "--ignore-index", 3, "-q",
               "--alpha", "0.4", "--out", res)[0] == 0
    for flags, warned in (([], False), (["--ignore-index", 3], False), (["--ignore-index", 0], True)):
        rc, _, err = run(capsys, "conformal", "eval", "--result", res, "--pred", pred, "--labels", lab, "-q", *flags)
        assert rc == 0, err
        assert ("warning: --ignore-index 0: the threshold was fitted with ignore index 3" in err) is warned, err
