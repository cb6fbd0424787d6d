"""Trust in the readers and writers (issue 16): bad files give one clear error, folders are whole.

Every refusal is a :class:`segcal.errors.InputError` whose message names the file. The fuzz test
at the end corrupts valid files of each format (truncation, random bytes) and checks the outcome
class: an ``InputError`` naming the file, or a read that returns -- never another exception.
"""

from __future__ import annotations

import io
import json
import pickle
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from segcal.errors import InputError
from segcal.io import PredictionFolder, read_label, read_prediction, write_prediction
from segcal.io.images import load_image
from segcal.io.nnunet import read_nnunet_prediction, read_properties
from segcal.io.predictions import read_folder_meta, write_folder_meta
from segcal.models import register_model, unregister_model
from segcal.pipeline.predict import predict_folder
from tiny_models import PixelConv

nib = pytest.importorskip("nibabel")


def _raises_naming(path: Path, fn, *args, match: str | None = None) -> InputError:
    with pytest.raises(InputError) as info:
        fn(*args)
    msg = str(info.value)
    assert path.name in msg, msg
    if match is not None:
        assert match in msg, msg
    return info.value


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _npz_bytes(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def _png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


LOGITS = np.random.default_rng(0).normal(size=(3, 6, 5)).astype(np.float32)
LABEL = (np.arange(30).reshape(6, 5) % 3).astype(np.uint8)


# ------------------------------------------------------------------------- NumPy files
def test_zero_byte_npy_names_the_file(tmp_path):
    p = tmp_path / "a.npy"
    p.write_bytes(b"")
    _raises_naming(p, read_prediction, p, match="empty")
    _raises_naming(p, read_label, p, match="empty")


def test_truncated_npy_names_the_file(tmp_path):
    p = tmp_path / "a.npy"
    p.write_bytes(_npy_bytes(LOGITS)[:-7])
    err = _raises_naming(p, read_prediction, p, match="truncated")
    assert "mmap length" not in str(err)
    q = tmp_path / "lab.npy"
    q.write_bytes(_npy_bytes(LABEL.astype(np.int64))[:-3])
    _raises_naming(q, read_label, q, match="truncated")


def test_truncated_npz_names_the_file(tmp_path):
    p = tmp_path / "a.npz"
    data = _npz_bytes(logits=LOGITS)
    p.write_bytes(data[: len(data) // 2])
    _raises_naming(p, read_prediction, p)
    p.write_bytes(b"")
    _raises_naming(p, read_prediction, p, match="empty")


def test_npz_without_known_key_names_the_file(tmp_path):
    p = tmp_path / "a.npz"
    p.write_bytes(_npz_bytes(scores=LOGITS))
    _raises_naming(p, read_prediction, p, match="'logits' or 'probabilities'")


def test_write_prediction_refuses_float16_overflow_and_nan(tmp_path):
    big = np.array([[1.0, -70000.0], [0.5, 2.0]], dtype=np.float32)
    with pytest.raises(InputError, match="outside the float16 range"):
        write_prediction(tmp_path / "a.npy", big)
    assert not (tmp_path / "a.npy").exists()
    write_prediction(tmp_path / "a.npy", big, dtype=np.float32)  # float32 holds it
    with pytest.raises(InputError, match="NaN"):
        write_prediction(tmp_path / "b.npy", np.array([[np.nan, 0.0], [0.0, 1.0]]))
    with np.errstate(divide="ignore"):  # -inf log-probabilities (p = 0) are stored as they are
        lp = np.log(np.array([[0.0, 1.0], [1.0, 0.0]], dtype=np.float32))
    assert np.isneginf(np.load(write_prediction(tmp_path / "c.npy", lp))).sum() == 2


# ------------------------------------------------------------------------- PNG files
def test_zero_byte_and_truncated_png(tmp_path):
    lab, img = tmp_path / "lab.png", tmp_path / "img.png"
    lab.write_bytes(b"")
    _raises_naming(lab, read_label, lab, match="empty")
    data = _png_bytes(LABEL)
    lab.write_bytes(data[: len(data) - 20])
    _raises_naming(lab, read_label, lab)
    img.write_bytes(b"")
    _raises_naming(img, load_image, img)
    rgb = _png_bytes(np.zeros((16, 16, 3), np.uint8) + 7)
    img.write_bytes(rgb[: len(rgb) // 2])
    _raises_naming(img, load_image, img)


def test_16_bit_png_labels_are_read_as_torch_ready_integers(tmp_path):
    lab = (np.arange(30).reshape(6, 5) % 3).astype(np.uint16) * 1000
    p = tmp_path / "l16.png"
    Image.fromarray(lab).save(p)
    got = read_label(p)
    np.testing.assert_array_equal(got, lab)
    assert got.dtype == np.int32
    torch.from_numpy(got)  # uint16 arrays cannot become tensors on every torch version


def test_16_bit_png_labels_in_eval_match_8_bit(tmp_path):
    from segcal.cli import main

    pred, l8, l16 = tmp_path / "p", tmp_path / "l8", tmp_path / "l16"
    for d in (pred, l8, l16):
        d.mkdir()
    rng = np.random.default_rng(1)
    for i in range(2):
        write_prediction(pred / f"c{i}.npy", rng.normal(size=(3, 6, 5)) * 2)
        lab = rng.integers(0, 3, (6, 5))
        Image.fromarray(lab.astype(np.uint8)).save(l8 / f"c{i}.png")
        Image.fromarray(lab.astype(np.uint16)).save(l16 / f"c{i}.png")
    outs = []
    for labels in (l8, l16):
        out = tmp_path / f"{labels.name}.json"
        assert main(["eval", "--pred", str(pred), "--labels", str(labels), "--no-progress",
                     "--json", str(out)]) == 0
        outs.append(json.loads(out.read_text()))
    assert outs[0]["ece"] == outs[1]["ece"] and outs[0]["accuracy"] == outs[1]["accuracy"]


def test_a_folder_without_predictions_says_so_not_a_stem_mismatch(tmp_path):
    pred, lab = tmp_path / "p", tmp_path / "l"
    pred.mkdir()
    lab.mkdir()
    (pred / "a.png").write_bytes(_png_bytes(LABEL))
    (lab / "a.png").write_bytes(_png_bytes(LABEL))
    with pytest.raises(InputError, match=r"no \.npy/\.npz predictions found in"):
        PredictionFolder(pred, lab)


def test_channel_last_prediction_gets_a_hint(tmp_path):
    pred, lab = tmp_path / "p", tmp_path / "l"
    write_prediction(pred / "a.npy", np.zeros((6, 5, 3)))
    lab.mkdir()
    (lab / "a.png").write_bytes(_png_bytes(LABEL))
    folder = PredictionFolder(pred, lab)
    with pytest.raises(InputError, match="looks channel-last"):
        folder.read(folder.items[0])


# ------------------------------------------------------------------------- segcal.json
def test_manifest_holding_a_list_or_invalid_json_names_the_file(tmp_path):
    write_prediction(tmp_path / "a.npy", LOGITS)
    meta = tmp_path / "segcal.json"
    meta.write_text("[1, 2]")
    _raises_naming(meta, read_folder_meta, tmp_path, match="list")
    _raises_naming(meta, PredictionFolder, tmp_path)
    meta.write_text('{"format": "segcal-predictions", ')
    _raises_naming(meta, read_folder_meta, tmp_path, match="invalid JSON")
    meta.write_text('{"input_type": "logit"}')
    _raises_naming(meta, read_folder_meta, tmp_path, match="input_type")


# ------------------------------------------------------------------------- folder integrity
@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    register_model("tiny-io-trust", PixelConv, num_classes=3, description="test model")
    yield "tiny-io-trust"
    unregister_model("tiny-io-trust")


@pytest.fixture
def images(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    rng = np.random.default_rng(0)
    for s in "abcd":
        Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).save(d / f"{s}.png")
    return d


def test_interrupted_predict_folder_is_refused_with_how_to_redo(tiny_model, images, tmp_path):
    out = tmp_path / "pred"
    seen = []

    def dies_on_the_third(img, stem):
        seen.append(stem)
        if len(seen) == 3:
            raise KeyboardInterrupt("simulated interruption")
        return img

    with pytest.raises(KeyboardInterrupt):
        predict_folder(tiny_model, images, out, device="cpu", progress=False, batch_size=1,
                       transform=dies_on_the_third)
    assert sorted(p.name for p in out.glob("*.npy")) == ["a.npy", "b.npy"]
    meta = json.loads((out / "segcal.json").read_text())
    assert meta["complete"] is False and meta["input_type"] == "logits"
    err = _raises_naming(out, PredictionFolder, out, match="incomplete")
    assert "again" in str(err)
    # the same command again finishes the folder, and the reader accepts it
    predict_folder(tiny_model, images, out, device="cpu", progress=False)
    assert json.loads((out / "segcal.json").read_text())["complete"] is True
    assert len(PredictionFolder(out)) == 4


def test_leftover_temporary_files_are_removed_by_the_next_run(tiny_model, images, tmp_path):
    out = tmp_path / "pred"
    out.mkdir()
    stale = [out / ".a.npy.k2j4_x9.tmp", out / ".segcal.json.abcdef12.tmp"]
    for p in stale:
        p.write_bytes(b"half a file")
    keep = out / ".hidden_user_file"
    keep.write_text("not ours")
    predict_folder(tiny_model, images, out, device="cpu", progress=False)
    assert not any(p.exists() for p in stale)
    assert keep.exists()


def test_interrupted_predict_volumes_is_refused(tmp_path):
    pytest.importorskip("monai")
    from segcal.pipeline.predict import predict_volumes

    vols = tmp_path / "vols"
    vols.mkdir()
    for i in range(3):
        nib.save(nib.Nifti1Image(np.random.default_rng(i).random((5, 6, 7)).astype(np.float32),
                                 np.eye(4)), str(vols / f"case{i}.nii.gz"))

    class DiesOnTheSecond(torch.nn.Module):
        calls = 0

        def forward(self, x):
            DiesOnTheSecond.calls += 1
            if DiesOnTheSecond.calls == 2:
                raise KeyboardInterrupt("simulated interruption")
            return torch.zeros((1, 3, *x.shape[2:]))

    out = tmp_path / "pred"
    with pytest.raises(KeyboardInterrupt):
        predict_volumes(DiesOnTheSecond(), vols, out)
    assert [p.name for p in out.glob("*.npy")] == ["case0.npy"]
    _raises_naming(out, PredictionFolder, out, match="incomplete")
    predict_volumes(DiesOnTheSecond(), vols, out)
    meta = read_folder_meta(out)
    assert meta["complete"] is True and sorted(meta["cases"]) == ["case0", "case1", "case2"]


def test_begin_and_finish_folder(tmp_path):
    from segcal.io.predictions import begin_folder, finish_folder, writing_folder

    out = begin_folder(tmp_path / "o", input_type="probs", num_classes=3)
    write_prediction(out / "a.npz", np.full((3, 2, 2), 1 / 3), key="probabilities")
    with pytest.raises(InputError, match="incomplete"):
        PredictionFolder(out)
    finish_folder(out)
    assert PredictionFolder(out).read(PredictionFolder(out).items[0])[2] == "probs"
    with pytest.raises(RuntimeError), writing_folder(tmp_path / "w", input_type="probs"):
        raise RuntimeError("boom")
    assert read_folder_meta(tmp_path / "w")["complete"] is False
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="not a folder"):
        begin_folder(tmp_path / "file")


def test_float16_probability_folder_is_accepted(tmp_path):
    """What ``segcal apply --output probs`` writes (float16) is read back by ``segcal eval``."""
    from segcal.cli import main

    pred, lab = tmp_path / "p", tmp_path / "l"
    lab.mkdir()
    rng = np.random.default_rng(0)
    c = 12
    for i in range(2):
        p = torch.softmax(torch.from_numpy(rng.normal(size=(c, 32, 32)) * 3), 0).numpy()
        write_prediction(pred / f"a{i}.npy", p, dtype=np.float16)
        np.save(lab / f"a{i}.npy", rng.integers(0, c, (32, 32)))
    write_folder_meta(pred, input_type="probs", num_classes=c, complete=True)
    s = np.load(pred / "a0.npy").astype(np.float64).sum(0)
    assert np.abs(s - 1).max() > 1e-4  # beyond float32's tolerance, within float16's rounding
    assert main(["eval", "--pred", str(pred), "--labels", str(lab), "--no-progress"]) == 0


# ------------------------------------------------------------------------- geometry
def test_nifti_label_affine_is_checked_against_the_prediction(tmp_path):
    pred, labs = tmp_path / "p", tmp_path / "l"
    labs.mkdir()
    lab = (np.arange(60).reshape(3, 4, 5) % 3).astype(np.uint8)
    aff = np.diag([1.0, 2.0, 3.0, 1.0])
    write_prediction(pred / "c.npy", np.zeros((3, 3, 4, 5)))
    write_folder_meta(pred, input_type="logits", num_classes=3,
                      cases={"c": {"shape": [3, 4, 5], "affine": aff.tolist()}})
    nib.save(nib.Nifti1Image(lab, aff), str(labs / "c.nii.gz"))
    folder = PredictionFolder(pred, labs)
    _, got, _ = folder.read(folder.items[0])
    np.testing.assert_array_equal(got, lab)
    moved = aff.copy()
    moved[0, 3] = 5.0  # same shape, shifted grid: a shape check cannot see it
    nib.save(nib.Nifti1Image(lab, moved), str(labs / "c.nii.gz"))
    folder = PredictionFolder(pred, labs)
    with pytest.raises(InputError, match=r"c\.nii\.gz has affine"):
        folder.read(folder.items[0])


def test_eval_refuses_a_label_volume_on_another_grid(tmp_path, capsys):
    from segcal.cli import main

    pred, labs = tmp_path / "p", tmp_path / "l"
    labs.mkdir()
    lab = (np.arange(60).reshape(3, 4, 5) % 3).astype(np.uint8)
    write_prediction(pred / "c.npy", np.random.default_rng(0).normal(size=(3, 3, 4, 5)))
    write_folder_meta(pred, input_type="logits", num_classes=3, complete=True,
                      cases={"c": {"shape": [3, 4, 5], "affine": np.eye(4).tolist()}})
    nib.save(nib.Nifti1Image(lab, np.eye(4)), str(labs / "c.nii.gz"))
    assert main(["eval", "--pred", str(pred), "--labels", str(labs), "--no-progress"]) == 0
    flipped = np.diag([-1.0, 1.0, 1.0, 1.0])  # a left-right flip: same shape, other voxels
    nib.save(nib.Nifti1Image(lab, flipped), str(labs / "c.nii.gz"))
    capsys.readouterr()
    assert main(["eval", "--pred", str(pred), "--labels", str(labs), "--no-progress"]) == 2
    assert "c.nii.gz has affine" in capsys.readouterr().err


# ------------------------------------------------------------------------- nnU-Net properties
class _Reduce:
    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _nnunet_case(tmp_path: Path, props_obj) -> Path:
    np.savez_compressed(tmp_path / "c.npz", probabilities=np.full((2, 2, 2, 2), 0.5, np.float32))
    (tmp_path / "c.pkl").write_bytes(pickle.dumps(props_obj, protocol=2))
    return tmp_path / "c.pkl"


def test_malicious_properties_pickle_is_an_input_error_naming_the_file(tmp_path):
    pkl = _nnunet_case(tmp_path, {"x": _Reduce(print, ("pwned",))})
    err = _raises_naming(pkl, read_properties, pkl, match="refusing to unpickle builtins.print")
    assert isinstance(err, pickle.UnpicklingError)  # still what the restricted unpickler raised
    _raises_naming(pkl, read_nnunet_prediction, tmp_path / "c.npz")


@pytest.mark.parametrize(("bomb", "refusal"), [
    (_Reduce(list, (range(10**7),)), "range"),
    (_Reduce(bytes, (10**9,)), "bytes(int)"),
    (_Reduce(np.ndarray, ((6000, 6000),)), "at most"),
    (_Reduce(np._core.multiarray._reconstruct, (np.ndarray, (6 * 10**7,), "f8")), "at most"),
], ids=["list-range", "bytes-n", "ndarray-shape", "reconstruct-shape"])
@pytest.mark.parametrize("protocol", [2, 4])
def test_a_tiny_properties_file_cannot_allocate_much(tmp_path, bomb, refusal, protocol):
    pkl = _nnunet_case(tmp_path, {"shape_before_cropping": bomb})
    pkl.write_bytes(pickle.dumps({"shape_before_cropping": bomb}, protocol=protocol))
    assert pkl.stat().st_size < 200
    tracemalloc.start()
    try:
        _raises_naming(pkl, read_properties, pkl, match=refusal)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 * 2**20, peak


def test_corrupt_properties_pickle(tmp_path):
    pkl = _nnunet_case(tmp_path, {"shape_before_cropping": (2, 2, 2)})
    data = pkl.read_bytes()
    for bad in (b"", data[: len(data) // 2], b"\x80\x02garbage"):
        pkl.write_bytes(bad)
        _raises_naming(pkl, read_properties, pkl)


# ------------------------------------------------------------------------- fuzz
def _nifti_bytes(arr: np.ndarray, gz: bool) -> bytes:
    img = nib.Nifti1Image(arr, np.eye(4))
    raw = img.to_bytes()
    if not gz:
        return raw
    import gzip

    return gzip.compress(raw, mtime=0)


_PROPS = {
    "sitk_stuff": {"spacing": (1.0, 1.0, 1.0), "origin": (0.0, 0.0, 0.0),
                   "direction": (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)},
    "spacing": [1.0, 1.0, 1.0], "shape_before_cropping": (2, 2, 2),
}

#: name -> (file name, valid bytes, reader(path))
FORMATS = {
    "npy-pred": ("p.npy", _npy_bytes(LOGITS), read_prediction),
    "npz-pred": ("p.npz", _npz_bytes(logits=LOGITS), read_prediction),
    "npy-label": ("l.npy", _npy_bytes(LABEL.astype(np.int64)), read_label),
    "png-label": ("l.png", _png_bytes(LABEL), read_label),
    "png16-label": ("l.png", _png_bytes(LABEL.astype(np.uint16)), read_label),
    "png-image": ("i.png", _png_bytes(np.zeros((6, 5, 3), np.uint8) + 40), load_image),
    "nii-label": ("l.nii", _nifti_bytes(LABEL[..., None], gz=False), read_label),
    "niigz-label": ("l.nii.gz", _nifti_bytes(LABEL[..., None], gz=True), read_label),
    "manifest": ("segcal.json", json.dumps({"format": "segcal-predictions", "input_type": "probs",
                                            "num_classes": 3, "complete": True}).encode(),
                 lambda p: read_folder_meta(p.parent)),
    "pkl": ("c.pkl", pickle.dumps(_PROPS, protocol=4), read_properties),
    "nnunet-npz": ("c.npz", _npz_bytes(probabilities=np.full((2, 2, 2, 2), 0.5, np.float32)),
                   read_nnunet_prediction),
}


@st.composite
def corrupted(draw):
    name = draw(st.sampled_from(sorted(FORMATS)))
    fname, data, reader = FORMATS[name]
    how = draw(st.sampled_from(["truncate", "flip", "random"]))
    if how == "truncate":
        data = data[: draw(st.integers(0, max(0, len(data) - 1)))]
    elif how == "flip":
        buf = bytearray(data)
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(buf) - 1))
            buf[i] = draw(st.integers(0, 255))
        data = bytes(buf)
    else:
        data = draw(st.binary(max_size=300))
    return name, fname, data, reader


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=corrupted())
def test_fuzz_corrupted_files_give_an_input_error_naming_the_file_or_a_read(tmp_path, case):
    name, fname, data, reader = case
    d = tmp_path / "fuzz"
    d.mkdir(exist_ok=True)
    for p in d.iterdir():
        p.unlink()
    if name == "pkl":
        (d / "c.npz").write_bytes(FORMATS["nnunet-npz"][1])
    if name == "nnunet-npz":
        (d / "c.pkl").write_bytes(FORMATS["pkl"][1])
    path = d / fname
    path.write_bytes(data)
    try:
        reader(path)
    except InputError as exc:  # anything else (BadZipFile, EOFError, ...) fails the test
        assert fname in str(exc), f"{name}: {exc}"


@st.composite
def corrupted_folder_file(draw):
    target = draw(st.sampled_from(["p/a.npy", "l/a.png", "p/segcal.json", "l/b.npy"]))
    how = draw(st.sampled_from(["truncate", "flip", "random"]))
    return target, how, draw(st.integers(0, 2**31 - 1))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=corrupted_folder_file())
def test_fuzz_eval_cli_on_a_corrupted_folder(tmp_path, capsys, case):
    """``segcal eval`` on a folder with one corrupted file: exit 0, or exit 2 with one line naming it."""
    from segcal.cli import main

    target, how, seed = case
    root = tmp_path / "cli"
    for sub in ("p", "l"):
        (root / sub).mkdir(parents=True, exist_ok=True)
        for f in (root / sub).iterdir():
            f.unlink()
    write_prediction(root / "p" / "a.npy", LOGITS)
    write_prediction(root / "p" / "b.npy", LOGITS[:, ::-1])
    write_folder_meta(root / "p", input_type="logits", num_classes=3, complete=True)
    (root / "l" / "a.png").write_bytes(_png_bytes(LABEL))
    np.save(root / "l" / "b.npy", LABEL.astype(np.int64))
    path = root / target
    data = path.read_bytes()
    rng = np.random.default_rng(seed)
    if how == "truncate":
        data = data[: int(rng.integers(0, len(data)))]
    elif how == "flip":
        buf = bytearray(data)
        for i in rng.integers(0, len(buf), size=4):
            buf[i] = int(rng.integers(0, 256))
        data = bytes(buf)
    else:
        data = rng.integers(0, 256, size=int(rng.integers(0, 200)), dtype=np.uint8).tobytes()
    path.write_bytes(data)
    capsys.readouterr()
    rc = main(["eval", "--pred", str(root / "p"), "--labels", str(root / "l"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc in (0, 2), err
    if rc == 2:
        assert err.startswith("segcal eval: error:") and "Traceback" not in err, err
        assert path.name in err, err


def test_read_ahead_hints_existing_files_and_refuses_nothing_else(tmp_path):
    """read_ahead (the streamed fit's look-ahead): True for a readable file where posix_fadvise
    exists, False (no exception) for a missing file; the file is unchanged."""
    import os

    from segcal.io.files import read_ahead

    f = tmp_path / "a.npy"
    np.save(f, np.arange(10))
    before = f.read_bytes()
    assert read_ahead(f) is hasattr(os, "posix_fadvise")
    assert f.read_bytes() == before
    assert read_ahead(tmp_path / "missing.npy") is False
