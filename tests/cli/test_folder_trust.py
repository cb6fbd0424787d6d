"""Trust audit (session 26): folder-level mistakes that gave a number with exit code 0 before.

* A prediction folder mixing logits and probability files (two tools' outputs merged, one
  ``apply --output probs`` file copied among logits): only the first file's kind was checked, so
  ``eval`` / ``fit`` / ``apply`` / ``conformal fit`` read the odd file with the others' input type
  (its softmax nearly uniform) and reported a wrong ECE. Now :class:`segcal.io.PredictionFolder`
  refuses it naming the file (:func:`segcal.validation.score_kind`).

* ``segcal apply`` / ``segcal predict`` into an ``--out`` that already held prediction files of
  another run (another ``--limit``, ``--corruption`` or input folder): the old files stayed beside
  the new ones under a manifest marked complete, and ``eval`` read them as one folder. Now the
  command refuses such an ``--out`` before writing anything, naming the files; rewriting the
  same files (the documented way to redo an interrupted run) still works.

* ``segcal conformal fit`` with ``--alpha`` / ``--delta`` outside (0, 1), ``--tau`` outside
  (0, 1] or a negative ``--class``: refused only after every file had been read (and, with void
  labels, first as a label error), naming ``alpha`` instead of the flag. Now before any file is
  read, naming the flag, as ``eval --conformal-*`` does.
* ``segcal eval --class-names`` with another count than the classes (``camvid``'s 12 names on
  a 4-class folder): the HTML report put the names on the wrong classes, exit 0. Now refused
  before the evaluation.

* ``segcal fit --json`` wrote ``NaN`` (the fit history's first training loss), which is not
  JSON: strict parsers (JavaScript, ``jq``) refuse the file. Now null, as every other output.

* ``segcal fit`` on a folder whose logits are NaN at ignored pixels (which ``eval`` accepts:
  the metrics leave them out) saved the calibrator, then failed in the before/after evaluation
  (a calibrator is applied to every pixel) with exit code 2 and an unnamed file: an output left
  behind by a failed command. Now the calibrator is saved after the evaluation, and the message
  names the file and says what to store there.

* ``segcal conformal apply`` / ``eval`` with a threshold fitted on predictions of another class
  count (another model): the files were written with a guarantee that does not hold for them,
  exit 0. The result now records the class count (``meta.num_classes``, also from ``eval
  --conformal-out``), and both commands refuse another one; older result files are read as before.

* Binary label maps stored as a 1-bit PNG (Pillow mode ``"1"``, accepted by the PNG reader) or
  a boolean ``.npy``: refused as "target: expected integer class labels, got bool", naming the
  prediction file. Now read as classes 0 / 1, the figures those of the same uint8 labels.

* A prediction saved with its batch axis, ``(1, C, H, W)``: the shape error now says so
  (``save x[0]``).

* A NIfTI label volume stored ``(X, Y, Z, 1)``: its header was read as ``(X, Y, Z)`` (the
  geometry checks) but its voxels as 4D, so ``eval`` refused it as another shape. Now read as the
  volume it holds.

Every expected figure below is recomputed with NumPy in the test (``metric_reference``).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from metric_reference import reference_metrics, softmax
from segcal.cli import main
from segcal.errors import InputError
from segcal.io import PredictionFolder
from segcal.io.predictions import read_folder_meta
from segcal.models import register_model, unregister_model
from segcal.pipeline.predict import predict_folder
from segcal.validation import looks_like_probabilities, score_kind
from tiny_models import PixelConv


def write_folder(root, kinds, c=4, shape=(5, 6), seed=0, dtype=np.float32, void=False):
    """``root/pred`` (file ``s{i}.npy`` holds logits or probabilities as ``kinds[i]`` says) and
    ``root/labels``; returns the folders, the logits and the labels."""
    rng = np.random.default_rng(seed)
    pred, lab = root / "pred", root / "labels"
    pred.mkdir(parents=True)
    lab.mkdir(parents=True)
    zs, ys = [], []
    for i, kind in enumerate(kinds):
        z = 2 * rng.normal(size=(c, *shape))
        y = rng.integers(0, c, size=shape).astype(np.uint8)
        if void:
            y[0, :2] = 255
        np.save(pred / f"s{i}.npy", (softmax(z[None])[0] if kind == "probs" else z).astype(dtype))
        np.save(lab / f"s{i}.npy", y)
        zs.append(z)
        ys.append(y)
    return pred, lab, np.stack(zs), np.stack(ys)


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """One intra-op thread for this module: a fit on these tiny folders took 1.1 s with two threads
    and 0.12 s with one on the loaded 2-core machine (load 2.5; torch parallelises the fit's small
    ops and waits for the second thread). The figures do not depend on the thread count
    (metrics/test_metrics.py::test_statistics_do_not_depend_on_torch_threads)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """``(pred, labels, calibrator)``: TS fitted once by ``segcal fit`` on three logit files
    (``write_folder``'s seed 0), shared by the tests that only apply it."""
    root = tmp_path_factory.mktemp("fitted")
    pred, lab, _, _ = write_folder(root, ["logits"] * 3)
    cal = root / "c.pt"
    rc = main([str(a) for a in ("fit", "--pred", pred, "--labels", lab, "-q", "--method", "ts", "--out", cal)])
    assert rc == 0 and cal.is_file()
    return pred, lab, cal


def test_score_kind_decides_from_values_and_leaves_non_finite_undecided():
    z = np.random.default_rng(1).normal(size=(5, 4, 3))
    p = softmax(z[None])[0]
    assert score_kind(z) == "logits" and score_kind(p) == "probs" and score_kind(p.astype(np.float16)) == "probs"
    assert looks_like_probabilities(p) and not looks_like_probabilities(z)
    p[0, 0, 0] = np.nan
    assert score_kind(p) is None and not looks_like_probabilities(p)
    assert score_kind(np.ones((1, 4))) is None and score_kind(np.ones((3, 4), dtype=np.int64)) is None


@pytest.mark.parametrize("first", ["logits", "probs"])
def test_a_folder_mixing_logits_and_probabilities_is_refused_naming_the_file(tmp_path, capsys, first):
    other = "probs" if first == "logits" else "logits"
    pred, lab, _, _ = write_folder(tmp_path, [first, first, other, first])
    flag = ["--probabilities"] if first == "probs" else []
    js = tmp_path / "m.json"
    cal = tmp_path / "c.pt"
    commands = {
        "eval": ["eval", "--pred", pred, "--labels", lab, "-q", "--json", js, *flag],
        "fit": ["fit", "--pred", pred, "--labels", lab, "-q", "--method", "ts", "--out", cal, *flag],
        "conformal fit": ["conformal", "fit", "--pred", pred, "--labels", lab, "-q", "--alpha", "0.5",
                          "--out", tmp_path / "r.json", *flag],
    }
    for name, argv in commands.items():
        rc, out, err = run(capsys, *argv)
        assert rc == 2, (name, out, err)
        assert "s2.npy" in err and "s0.npy" in err and "same kind of scores" in err, (name, err)
        assert err.count("\n") == 1 and "Traceback" not in err
    assert not js.exists() and not cal.exists() and not (tmp_path / "r.json").exists()


def test_apply_refuses_a_mixed_folder_and_leaves_it_marked_incomplete(tmp_path, capsys, fitted):
    _, _, cal = fitted
    pred, _, _, _ = write_folder(tmp_path / "mixed", ["logits", "probs", "logits"])
    out = tmp_path / "out"
    rc, _, err = run(capsys, "apply", "--calibrator", cal, "--pred", pred, "--out", out, "-q")
    assert rc == 2 and "s1.npy" in err and "same kind of scores" in err
    with pytest.raises(InputError, match="incomplete"):
        PredictionFolder(out)


def test_a_consistent_folder_still_gives_the_reference_figures(tmp_path, capsys):
    """The check refuses nothing it should read: float16 logits with void labels, and the same
    images as probabilities, give the NumPy reference ECE / NLL / Brier / mIoU."""
    for kind, flag in (("logits", []), ("probs", ["--probabilities"])):
        pred, lab, _, y = write_folder(tmp_path / kind, [kind] * 4, dtype=np.float16, void=True)
        js = tmp_path / f"{kind}.json"
        rc, _, err = run(capsys, "eval", "--pred", pred, "--labels", lab, "--ignore-index", 255, "-q",
                         "--json", js, *flag)
        assert rc == 0, err
        got = json.loads(js.read_text())
        stored = np.stack([np.load(pred / f"s{i}.npy").astype(np.float64) for i in range(4)])
        probs = stored if kind == "probs" else softmax(stored)
        ref = reference_metrics(probs, y, n_bins=15, ignore_index=255)
        for key in ("ece", "nll", "brier", "miou", "accuracy"):
            assert got[key] == pytest.approx(ref[key], abs=1e-6), (kind, key)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(2, 5), data=st.data(), dtype=st.sampled_from([np.float16, np.float32, np.float64]),
       c=st.integers(2, 6))
def test_fuzz_one_odd_file_anywhere_is_named(tmp_path_factory, n, data, dtype, c):
    first = data.draw(st.sampled_from(["logits", "probs"]))
    odd = data.draw(st.integers(1, n - 1))
    kinds = [first] * n
    kinds[odd] = "probs" if first == "logits" else "logits"
    root = tmp_path_factory.mktemp("mix")
    pred, lab, _, _ = write_folder(root, kinds, c=c, dtype=dtype, seed=odd)
    folder = PredictionFolder(pred, lab, input_type=first)
    with pytest.raises(InputError, match=f"s{odd}.npy.*same kind of scores"):
        for _ in folder:
            pass


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_apply_refuses_an_out_holding_files_of_another_run_and_redoes_its_own(tmp_path, capsys, fitted):
    pred, _, cal = fitted
    out = tmp_path / "out"
    assert run(capsys, "apply", "--calibrator", cal, "--pred", pred, "--out", out, "-q")[0] == 0
    # the same run again into the same --out (how an interrupted run is redone): accepted
    before = _snapshot(out)
    assert run(capsys, "apply", "--calibrator", cal, "--pred", pred, "--out", out, "-q")[0] == 0
    assert sorted(_snapshot(out)) == sorted(before)
    # another input folder with fewer images into that --out: refused, the folder untouched
    other, _, _, _ = write_folder(tmp_path / "b", ["logits"] * 2, seed=5)
    before = _snapshot(out)
    rc, _, err = run(capsys, "apply", "--calibrator", cal, "--pred", other, "--out", out, "-q")
    assert rc == 2 and "s2.npy" in err and "--out" in err and "does not write" in err, err
    assert err.count("\n") == 1
    assert _snapshot(out) == before
    # an --out holding an unrelated prediction file: refused too
    stray = tmp_path / "stray"
    stray.mkdir()
    np.save(stray / "zzz.npy", np.zeros((4, 5, 6), np.float32))
    rc, _, err = run(capsys, "apply", "--calibrator", cal, "--pred", pred, "--out", stray, "-q")
    assert rc == 2 and "zzz.npy" in err
    assert sorted(p.name for p in stray.iterdir()) == ["zzz.npy"]


def test_predict_refuses_an_out_holding_images_it_does_not_predict(tmp_path, capsys):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    for stem in "abc":
        Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).save(imgs / f"{stem}.png")
    register_model("tiny-stale", PixelConv, num_classes=3, class_names=["r", "g", "b"], ignore_index=255,
                   description="test model")
    try:
        out = tmp_path / "out"
        argv = ["predict", "--model", "tiny-stale", "--images", imgs, "--out", out, "-q", "--device", "cpu"]
        assert run(capsys, *argv)[0] == 0
        assert run(capsys, *argv)[0] == 0  # the same images again: rewritten
        before = _snapshot(out)
        rc, _, err = run(capsys, *argv, "--limit", "2")
        assert rc == 2 and "c.npy" in err and "does not write" in err, err
        assert _snapshot(out) == before and read_folder_meta(out)["n_images"] == 3
        # the library default (the bench caches) still adds the missing images to a folder
        predict_folder("tiny-stale", imgs, tmp_path / "cache", limit=1, progress=False, device="cpu")
        res = predict_folder("tiny-stale", imgs, tmp_path / "cache", progress=False, device="cpu")
        assert sorted(res.stems) == ["a", "b", "c"]
    finally:
        unregister_model("tiny-stale")


@pytest.mark.parametrize("flags, named", [
    (["--alpha", "1.5"], "--alpha"), (["--alpha", "nan"], "--alpha"), (["--alpha", "0"], "--alpha"),
    (["--alpha", "0.2", "--delta", "2"], "--delta"),
    (["--alpha", "0.2", "--risk", "coverage", "--tau", "1.5"], "--tau"),
    (["--alpha", "0.2", "--risk", "fnr", "--class", "-1"], "--class"),
])
def test_conformal_fit_refuses_bad_levels_before_reading_a_file(tmp_path, capsys, flags, named):
    pred, lab, _, _ = write_folder(tmp_path, ["logits"] * 3)
    (pred / "s1.npy").write_bytes(b"")  # a file that would be refused if it were read
    out = tmp_path / "r.json"
    rc, _, err = run(capsys, "conformal", "fit", "--pred", pred, "--labels", lab, "-q", *flags, "--out", out)
    assert rc == 2 and err.split("error: ", 1)[1].startswith(named), err
    assert "s1.npy" not in err and not out.exists()


@pytest.mark.parametrize("names", ["a,b", "a,b,c,d,e", "camvid"])
def test_eval_refuses_class_names_of_another_count(tmp_path, capsys, names):
    pred, lab, _, _ = write_folder(tmp_path, ["logits"] * 2)
    html = tmp_path / "r.html"
    rc, out, err = run(capsys, "eval", "--pred", pred, "--labels", lab, "-q", "--class-names", names,
                       "--html", html)
    assert rc == 2 and "--class-names" in err and "4 classes" in err and "s0.npy" in err, err
    assert out == "" and not html.exists()


def _strict(path):
    def refuse(token):
        raise AssertionError(f"{path.name}: {token} is not JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


def test_every_json_output_is_strict_json(tmp_path, capsys):
    """fit, eval, estimate, pseudolabel and conformal write JSON without NaN / Infinity tokens,
    also where a value is undefined (a class never present: IoU null; the first training loss)."""
    pred, lab, _, y = write_folder(tmp_path, ["logits"] * 4, c=5, void=True)
    for i in range(4):  # class 4 never labelled
        np.save(lab / f"s{i}.npy", np.where(y[i] == 4, 0, y[i]).astype(np.uint8))
    out = {k: tmp_path / f"{k}.json" for k in ("fit", "eval", "estimate", "pseudo", "conformal")}
    commands = [
        ["fit", "--pred", pred, "--labels", lab, "--ignore-index", 255, "-q", "--method", "ts",
         "--out", tmp_path / "c.pt", "--json", out["fit"]],
        ["eval", "--pred", pred, "--labels", lab, "--ignore-index", 255, "-q", "--json", out["eval"]],
        ["estimate", "--pred", pred, "--baseline", "maxprob", "-q", "--json", out["estimate"]],
        ["pseudolabel", "--pred", pred, "--out", tmp_path / "pl", "-q", "--labels", lab, "--label-ignore", 255,
         "--json", out["pseudo"]],
        ["conformal", "fit", "--pred", pred, "--labels", lab, "--ignore-index", 255, "-q", "--alpha", "0.5",
         "--out", out["conformal"]],
    ]
    for argv in commands:
        rc, _, err = run(capsys, *argv)
        assert rc == 0, (argv[0], err)
    got = {k: _strict(p) for k, p in out.items()}
    assert got["eval"]["iou_per_class"][4] is None or got["eval"]["iou_per_class"][4] == 0.0
    assert got["fit"]["fit_info"]["stages"][0]["history"][0]["train"] is None


def test_fit_that_fails_in_its_evaluation_leaves_no_calibrator(tmp_path, capsys):
    pred, lab, _, y = write_folder(tmp_path, ["logits"] * 3, void=True)
    for i in range(3):
        z = np.load(pred / f"s{i}.npy")
        z[:, y[i] == 255] = np.nan  # only where the label is void
        np.save(pred / f"s{i}.npy", z)
    assert run(capsys, "eval", "--pred", pred, "--labels", lab, "--ignore-index", 255, "-q")[0] == 0
    cal = tmp_path / "c.pt"
    rc, _, err = run(capsys, "fit", "--pred", pred, "--labels", lab, "--ignore-index", 255, "-q",
                     "--method", "ts", "--out", cal)
    assert rc == 2 and "s2.npy" in err and "nan_to_num" in err and err.count("\n") == 1, err
    assert not cal.exists()


def test_conformal_threshold_of_another_class_count_is_refused(tmp_path, capsys):
    pred, lab, _, _ = write_folder(tmp_path / "four", ["logits"] * 6, void=True)
    res = tmp_path / "r.json"
    via_eval = tmp_path / "r2.json"
    assert run(capsys, "conformal", "fit", "--pred", pred, "--labels", lab, "--ignore-index", 255, "-q",
               "--alpha", "0.5", "--out", res)[0] == 0
    assert run(capsys, "eval", "--pred", pred, "--labels", lab, "--ignore-index", 255, "-q",
               "--conformal-alpha", "0.5", "--conformal-out", via_eval)[0] == 0
    assert json.loads(res.read_text())["meta"]["num_classes"] == 4
    assert json.loads(via_eval.read_text())["meta"]["num_classes"] == 4
    five, lab5, _, _ = write_folder(tmp_path / "five", ["logits"] * 3, c=5, void=True)
    for r in (res, via_eval):
        out = tmp_path / "sets"
        rc, _, err = run(capsys, "conformal", "apply", "--result", r, "--pred", five, "--out", out, "-q")
        assert rc == 2 and "4 classes" in err and "s0.npy has 5" in err and not out.exists(), err
        rc, _, err = run(capsys, "conformal", "eval", "--result", r, "--pred", five, "--labels", lab5, "-q")
        assert rc == 2 and "4 classes" in err, err
    # the same class count is applied; a result written before the count was recorded too
    assert run(capsys, "conformal", "apply", "--result", res, "--pred", pred, "--out", tmp_path / "ok", "-q")[0] == 0
    old = json.loads(res.read_text())
    del old["meta"]["num_classes"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert run(capsys, "conformal", "apply", "--result", tmp_path / "old.json", "--pred", five,
               "--out", tmp_path / "old_sets", "-q")[0] == 0


@pytest.mark.parametrize("store", ["png1", "bool_npy"])
def test_binary_label_maps_are_read_as_classes_0_and_1(tmp_path, capsys, store):
    pred, lab, _, y = write_folder(tmp_path / "u8", ["logits"] * 3, c=2)
    other = tmp_path / store
    other.mkdir()
    for i in range(3):
        if store == "png1":
            Image.fromarray(y[i] > 0).convert("1").save(other / f"s{i}.png")
        else:
            np.save(other / f"s{i}.npy", y[i] > 0)
    got = {}
    for name, labels in (("u8", lab), (store, other)):
        js = tmp_path / f"{name}.json"
        rc, _, err = run(capsys, "eval", "--pred", pred, "--labels", labels, "-q", "--json", js)
        assert rc == 0, err
        got[name] = _strict(js)
    for key in ("ece", "nll", "brier", "miou", "n_pixels", "confusion_matrix"):
        assert got[store][key] == got["u8"][key], key


def test_a_prediction_saved_with_its_batch_axis_gets_a_hint(tmp_path, capsys):
    pred, lab, _, _ = write_folder(tmp_path, ["logits"] * 2)
    np.save(pred / "s1.npy", np.load(pred / "s1.npy")[None])
    rc, _, err = run(capsys, "eval", "--pred", pred, "--labels", lab, "-q")
    assert rc == 2 and "s1.npy" in err and "x[0]" in err and err.count("\n") == 1, err


def test_a_4d_nifti_label_with_one_time_point_is_read_as_its_volume(tmp_path, capsys):
    nib = pytest.importorskip("nibabel")
    rng = np.random.default_rng(3)
    pred, lab = tmp_path / "pred", tmp_path / "labels"
    pred.mkdir()
    lab.mkdir()
    z = rng.normal(size=(3, 4, 5, 6)).astype(np.float32)
    y = rng.integers(0, 3, size=(4, 5, 6)).astype(np.uint8)
    np.save(pred / "v.npy", z)
    nib.save(nib.Nifti1Image(y[..., None], np.eye(4)), lab / "v.nii.gz")
    js = tmp_path / "m.json"
    rc, _, err = run(capsys, "eval", "--pred", pred, "--labels", lab, "-q", "--json", js)
    assert rc == 0, err
    ref = reference_metrics(softmax(z[None].astype(np.float64)), y[None], n_bins=15)
    got = _strict(js)
    for key in ("ece", "nll", "brier", "miou"):
        assert got[key] == pytest.approx(ref[key], abs=1e-6), key
