"""``segcal conformal apply --format npz|png|nifti|nnunet``: the files read back to the sets
(unpacked bits == :func:`~segcal.conformal.apply_sets`), carry the guarantee in their metadata and
in the folder manifest, keep the source geometry, and are written all or nothing."""

from __future__ import annotations

import contextlib
import io
import json
import pickle
import tempfile
from pathlib import Path

import numpy as np
import pytest
from conformal_synthetic import IGNORE, pool
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from segcal.cli import main
from segcal.cli.parsers import conformal as conformal_parser
from segcal.conformal import (
    OUTPUT_FORMATS,
    ConformalResult,
    apply_sets,
    decode_codes,
    default_grid,
    encode_codes,
    fit_threshold,
    loss_table,
)
from segcal.conformal.writers import read_nifti_output, read_png
from segcal.io.nnunet import read_nnunet_prediction

nib = pytest.importorskip("nibabel")

SKEW = np.array([[0.0, 0.0, -1.5, 10.0], [1.2, 0.0, 0.0, -4.0], [0.0, 0.8, 0.0, 7.0], [0, 0, 0, 1.0]])


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(0))
    return e / e.sum(0)


def fitted(tmp_path: Path, risk: str = "miscoverage", num_classes: int = 4, **kw) -> tuple[Path, ConformalResult]:
    """A result fitted on synthetic images (4 classes unless told), saved as JSON."""
    rng = np.random.default_rng(1)
    imgs = pool(rng, 60, num_classes=num_classes)
    res = fit_threshold(loss_table(imgs, risk, grid=default_grid(101), ignore_index=IGNORE, **kw), 0.2)
    path = tmp_path / "cr.json"
    res.save(path)
    return path, res


def folder_2d(root: Path, num_classes: int, n: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    probs = {}
    for i in range(n):
        p = softmax(rng.normal(size=(num_classes, 5 + i, 7)) * 3).astype(np.float32)
        np.save(root / f"im{i}.npy", p)
        probs[f"im{i}"] = p
    return probs


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as exc:  # argparse: usage + error, exit code 2
            rc = int(exc.code or 0)
    return rc, out.getvalue(), err.getvalue()


def apply(pred: Path, cr: Path, out: Path, fmt: str, *extra: str) -> int:
    return main(["conformal", "apply", "--pred", str(pred), "--result", str(cr), "--probabilities",
                 "--format", fmt, "--out", str(out), *extra])


# ------------------------------------------------------------------------------ codes
@pytest.mark.parametrize("num_classes", [1, 3, 8, 9, 16, 17, 40, 70])
@pytest.mark.parametrize("max_bits", [16, 64])
def test_codes_roundtrip(num_classes, max_bits):
    rng = np.random.default_rng(num_classes)
    masks = rng.random((num_classes, 4, 5, 3)) < 0.4
    codes = encode_codes(masks, max_bits)
    assert len(codes) == -(-num_classes // max_bits)
    first = min(num_classes, max_bits)
    expect = next(dt for dt, bits in ((np.uint8, 8), (np.uint16, 16), (np.uint32, 32), (np.uint64, 64)) if first <= bits)
    assert codes[0].dtype == expect
    np.testing.assert_array_equal(decode_codes(codes, num_classes, max_bits), masks)
    # bit k = class k, by an independent sum of powers of two
    ref = sum(masks[k].astype(np.uint64) * (np.uint64(1) << np.uint64(k)) for k in range(first))
    np.testing.assert_array_equal(codes[0].astype(np.uint64), ref)


def test_parser_formats_equal_the_writers():
    assert conformal_parser.OUTPUT_FORMATS == OUTPUT_FORMATS


# ------------------------------------------------------------------------------ 2D
@pytest.mark.parametrize("num_classes", [4, 12, 20])
def test_png_sets_read_back_and_carry_the_guarantee(tmp_path, num_classes):
    cr, res = fitted(tmp_path, num_classes=num_classes)
    probs = folder_2d(tmp_path / "pred", num_classes)
    out = tmp_path / "out"
    assert apply(tmp_path / "pred", cr, out, "png") == 0
    man = json.loads((out / "conformal.json").read_text())
    assert man["outputs"]["format"] == "png" and man["outputs"]["complete"] is True
    assert ConformalResult.load(out / "conformal.json") == res  # the manifest is a result file too
    parts = 1 if num_classes <= 16 else 2
    for stem, p in probs.items():
        sets = apply_sets(res, p)
        names = [f"sets/{stem}.png"] if parts == 1 else [f"sets/{stem}_part{g}.png" for g in range(parts)]
        assert man["outputs"]["files"][stem] == [*names, f"sizes/{stem}.png"]
        read = [read_png(out / n) for n in names]
        codes = [a for a, _ in read]
        assert codes[0].dtype == (np.uint8 if num_classes <= 8 else np.uint16)
        np.testing.assert_array_equal(decode_codes(codes, num_classes, 16), sets.masks())
        np.testing.assert_array_equal(decode_codes(codes, num_classes, 16), p.astype(np.float64) >= 1 - res.lam)
        size, meta = read_png(out / "sizes" / f"{stem}.png")
        np.testing.assert_array_equal(size, sets.sizes)
        for _, m in [*read, (size, meta)]:
            assert m["alpha"] == 0.2 and m["lambda"] == res.lam and m["method"] == "crc"
            assert m["n_calibration_units"] == 60 and m["risk"] == "miscoverage"
            assert m["guarantee"] == res.guarantee and m["exchangeable_unit"].startswith("image")
    assert not list(tmp_path.glob(".out.*"))  # no staging folder left


def test_png_recall_mask_of_an_fnr_result(tmp_path):
    cr, res = fitted(tmp_path, "fnr", class_index=2)
    probs = folder_2d(tmp_path / "pred", 4)
    out = tmp_path / "out"
    assert apply(tmp_path / "pred", cr, out, "png") == 0
    for stem, p in probs.items():
        mask, meta = read_png(out / "recall" / f"{stem}.png")
        np.testing.assert_array_equal(mask.astype(bool), p[2].astype(np.float64) >= 1 - res.lam)
        assert meta["content"] == "recall" and meta["class_index"] == 2
    assert not (out / "sets").exists() and not (out / "sizes").exists()


def test_npz_keeps_its_layout_and_gains_the_guarantee(tmp_path):
    cr, res = fitted(tmp_path)
    probs = folder_2d(tmp_path / "pred", 4)
    out = tmp_path / "out"
    assert apply(tmp_path / "pred", cr, out, "npz") == 0
    for stem, p in probs.items():
        with np.load(out / f"{stem}.npz") as z:
            masks = np.unpackbits(z["packed"], axis=0, count=int(z["num_masks"])).astype(bool)
            np.testing.assert_array_equal(masks, apply_sets(res, p).masks())
            assert json.loads(str(z["guarantee"]))["lambda"] == res.lam


# ------------------------------------------------------------------------------ 3D
def volumes(root: Path, ref: Path | None, n: int = 2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    root.mkdir(parents=True)
    if ref is not None:
        ref.mkdir(parents=True)
    probs = {}
    for i in range(n):
        shape = (4 + i, 5, 6)
        p = softmax(rng.normal(size=(4, *shape)) * 3).astype(np.float32)
        np.save(root / f"case{i}.npy", p)
        probs[f"case{i}"] = p
        if ref is not None:
            img = nib.Nifti1Image(rng.normal(size=shape).astype(np.float32), SKEW)
            img.set_qform(SKEW, code=1)
            img.set_sform(SKEW, code=2)
            img.header.set_xyzt_units("mm", "sec")
            nib.save(img, str(ref / f"case{i}_0000.nii.gz"))  # nnU-Net raw image naming
    return probs


@pytest.mark.parametrize("risk,kw", [("miscoverage", {}), ("fnr", {"class_index": 1})])
def test_nifti_keeps_the_reference_header_and_reads_back(tmp_path, risk, kw):
    cr, res = fitted(tmp_path, risk, **kw)
    probs = volumes(tmp_path / "pred", tmp_path / "ref")
    out = tmp_path / "out"
    assert apply(tmp_path / "pred", cr, out, "nifti", "--reference", str(tmp_path / "ref")) == 0
    for stem, p in probs.items():
        sets = apply_sets(res, p)
        files = ["recall"] if risk == "fnr" else ["sets", "sizes"]
        for sub in files:
            arr, aff, meta, descrip = read_nifti_output(out / sub / f"{stem}.nii.gz")
            np.testing.assert_allclose(aff, SKEW, atol=1e-6)
            hdr = nib.load(str(out / sub / f"{stem}.nii.gz")).header
            assert int(hdr["sform_code"]) == 2 and hdr.get_xyzt_units() == ("mm", "sec")
            if sub == "sets":
                assert arr.dtype == np.uint8
                np.testing.assert_array_equal(decode_codes([arr], 4, 64), sets.masks())
            elif sub == "sizes":
                np.testing.assert_array_equal(arr, sets.sizes)
            else:
                np.testing.assert_array_equal(arr.astype(bool), p[1].astype(np.float64) >= 1 - res.lam)
            assert meta["guarantee"] == res.guarantee and meta["exchangeable_unit"].startswith("volume")
            assert descrip.startswith(f"segcal crc {'fnr1' if risk == 'fnr' else 'miscoverage'} a=0.2")
            assert len(descrip) <= 80 and "n=60 unit=volume" in descrip


def test_nifti_affine_from_the_prediction_manifest_or_refused(tmp_path, capsys):
    cr, _ = fitted(tmp_path)
    volumes(tmp_path / "pred", None)
    assert apply(tmp_path / "pred", cr, tmp_path / "out", "nifti") == 2
    assert "--reference" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    cases = {f"case{i}": {"affine": (SKEW * (i + 1)).tolist()} for i in range(2)}
    (tmp_path / "pred" / "segcal.json").write_text(json.dumps({"format": "segcal-predictions", "version": 1,
                                                               "input_type": "probs", "cases": cases}))
    assert apply(tmp_path / "pred", cr, tmp_path / "out", "nifti") == 0
    _, aff, _, _ = read_nifti_output(tmp_path / "out" / "sets" / "case1.nii.gz")
    np.testing.assert_allclose(aff[:3], (SKEW * 2)[:3], atol=1e-5)


def nnunet_case(folder: Path, stem: str, shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """An nnU-Net v2 case as NibabelIO writes it: array = nibabel data transposed (2, 1, 0)."""
    rng = np.random.default_rng(seed)
    p = softmax(rng.normal(size=(3, *shape)) * 3).astype(np.float32)  # nibabel order
    arr = p.transpose(0, 3, 2, 1)
    props = {"nibabel_stuff": {"original_affine": SKEW}, "spacing": [1.0, 1.0, 1.0],
             "shape_before_cropping": arr.shape[1:], "bbox_used_for_cropping": [[0, s] for s in arr.shape[1:]]}
    np.savez_compressed(folder / f"{stem}.npz", probabilities=arr)
    with open(folder / f"{stem}.pkl", "wb") as fh:
        pickle.dump(props, fh)
    return p


def test_nnunet_sets_line_up_like_the_source(tmp_path):
    rng = np.random.default_rng(2)
    imgs = pool(rng, 60, num_classes=3)
    res = fit_threshold(loss_table(imgs, grid=default_grid(101), ignore_index=IGNORE), 0.2)
    res.save(tmp_path / "cr.json")
    pred = tmp_path / "pred"
    pred.mkdir()
    probs = {f"c{i}": nnunet_case(pred, f"c{i}", (4, 6, 5 + i), i) for i in range(2)}
    out = tmp_path / "out"
    assert main(["conformal", "apply", "--pred", str(pred), "--result", str(tmp_path / "cr.json"),
                 "--format", "nnunet", "--out", str(out)]) == 0
    for stem, p in probs.items():
        sets = apply_sets(res, p)
        back, _, _ = read_nnunet_prediction(out / "sets" / f"{stem}.npz")  # the source's axis order undone
        np.testing.assert_array_equal(back.astype(bool), sets.masks())
        size, aff, meta, _ = read_nifti_output(out / "sizes" / f"{stem}.nii.gz")
        np.testing.assert_array_equal(size, sets.sizes)
        np.testing.assert_allclose(aff, SKEW, atol=1e-6)
        assert meta["content"] == "sizes"
    # a .npy source is not an nnU-Net case: refused, nothing written
    np.save(pred / "z.npy", next(iter(probs.values())))
    assert main(["conformal", "apply", "--pred", str(pred), "--result", str(tmp_path / "cr.json"),
                 "--probabilities", "--format", "nnunet", "--out", str(tmp_path / "out2")]) == 2
    assert not (tmp_path / "out2").exists()


# ------------------------------------------------------------------------------ atomic
def test_nothing_half_written_on_error(tmp_path, capsys):
    cr, _ = fitted(tmp_path)
    folder_2d(tmp_path / "pred", 4)
    out = tmp_path / "out"
    assert apply(tmp_path / "pred", cr, out, "png") == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    # the last file of the folder is broken: the earlier ones were written, then everything is dropped
    (tmp_path / "pred" / "im2.npy").write_bytes(b"\x93NUMPY broken")
    assert apply(tmp_path / "pred", cr, out, "npz") == 2
    assert "im2" in capsys.readouterr().err
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before  # the previous complete output is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cr.json", "out", "pred"]  # no staging folder
    # a 3D file in a PNG run: refused, no output folder
    np.save(tmp_path / "pred" / "im2.npy", np.full((4, 2, 3, 3), 0.25, np.float32))
    assert apply(tmp_path / "pred", cr, tmp_path / "new", "png") == 2
    assert "PNG holds 2D images" in capsys.readouterr().err and not (tmp_path / "new").exists()
    # a folder apply did not write is never replaced
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    np.save(tmp_path / "pred" / "im2.npy", np.full((4, 2, 3), 0.25, np.float32))
    assert apply(tmp_path / "pred", cr, other, "png") == 2
    assert (other / "keep.txt").read_text() == "x" and len(list(other.iterdir())) == 1


# ------------------------------------------------------------------------------ fuzz
FUZZ = settings(max_examples=10, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@FUZZ
@given(flags=st.lists(st.sampled_from([
    "--format", "png", "nifti", "nnunet", "npz", "jpeg", "", "--reference", "REF", "MISSING", "--out",
    "--probabilities", "--input-type", "logits", "--calibrator", "PRED",
]), max_size=6))
def test_random_apply_flags(flags):
    """Any flag combination: exit 0 or one clear line with exit 2; inputs untouched; no staging left."""
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        cr, _ = fitted(root)
        folder_2d(root / "pred", 4)
        volumes(root / "vol", root / "ref")
        subst = {"REF": str(root / "ref"), "MISSING": str(root / "missing"), "PRED": str(root / "pred")}
        argv = ["conformal", "apply", "--pred", str(root / "pred"), "--result", str(cr), "--out",
                str(root / "out"), *[subst.get(f, f) for f in flags]]
        before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
        rc, _, err = run_cli(argv)
        assert rc in (0, 2), err
        assert "Traceback" not in err
        if rc == 2 and not err.startswith("usage:"):
            assert err.strip().count("\n") == 0 and err.startswith("segcal conformal: error: "), err
        assert {p: p.read_bytes() for p in before} == before
        assert not [p for p in root.iterdir() if p.name.endswith((".partial", ".old"))]


@FUZZ
@given(data=st.binary(max_size=300), fmt=st.sampled_from(OUTPUT_FORMATS), where=st.sampled_from(["2d", "3d"]))
def test_random_bytes_as_a_prediction(data, fmt, where):
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        cr, _ = fitted(root)
        if where == "2d":
            folder_2d(root / "pred", 4)
            bad = root / "pred" / "im1.npy"
        else:
            volumes(root / "pred", None)
            bad = root / "pred" / "case1.npy"
        bad.write_bytes(data)
        rc, _, err = run_cli(["conformal", "apply", "--pred", str(root / "pred"), "--result", str(cr),
                              "--probabilities", "--format", fmt, "--out", str(root / "out")])
        assert rc == 2 and err.strip().count("\n") == 0 and err.startswith("segcal conformal: error: "), err
        assert not (root / "out").exists()
        assert not [p for p in root.iterdir() if p.name.endswith(".partial")]
