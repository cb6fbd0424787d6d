"""The class count of a prediction folder from its first file's header (session 27).

:func:`segcal.io.arrays.prediction_shape` (``.npy``, ``.npz``, nnU-Net cases) and
:attr:`segcal.io.PredictionFolder.num_classes` are the one way to learn it before reading the
folder: ``segcal conformal`` (through ``PredictionFolder.read``, which also decoded the first
label) and ``segcal eval --class-names`` (``read_prediction`` inline) each had their own.
The expected shapes are NumPy's own reading of the files.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from segcal.errors import InputError
from segcal.io import PredictionFolder
from segcal.io.arrays import prediction_shape

FORMATS = ("npy", "npz-logits", "npz-probabilities", "npz-compressed")


def damage(path, cut, flip):
    """Cut ``path`` to the fraction ``cut`` of its bytes and invert the byte ``flip`` (mod its
    length); None: that damage not done."""
    data = bytearray(path.read_bytes())
    if cut is not None:
        data = data[: int(cut * len(data))]
    if flip is not None and data:
        data[flip % len(data)] ^= 0xFF
    path.write_bytes(bytes(data))


def save(path_stem, arr, fmt):
    if fmt == "npy":
        path = path_stem.with_suffix(".npy")
        np.save(path, arr)
    else:
        path = path_stem.with_suffix(".npz")
        key = "probabilities" if fmt == "npz-probabilities" else "logits"
        (np.savez_compressed if fmt == "npz-compressed" else np.savez)(path, **{key: arr})
    return path


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=st.lists(st.integers(1, 6), min_size=2, max_size=4),
       dtype=st.sampled_from(["<f2", "<f4", ">f4", "<f8"]), fmt=st.sampled_from(FORMATS),
       cut=st.one_of(st.none(), st.floats(0.0, 1.0)), flip=st.one_of(st.none(), st.integers(0, 10**6)))
def test_fuzz_prediction_shape_is_numpys_or_an_input_error(tmp_path_factory, shape, dtype, fmt, cut, flip):
    root = tmp_path_factory.mktemp("hdr")
    arr = np.arange(int(np.prod(shape)), dtype=dtype).reshape(shape)
    path = save(root / "s0", arr, fmt)
    damage(path, cut, flip)
    try:
        got = prediction_shape(path)
    except InputError as exc:
        assert path.name in str(exc)
        return
    if cut is None and flip is None:
        assert got == tuple(shape)
    else:  # a damaged file whose header still reads: the header's shape (the data are checked on read)
        assert len(got) >= 2


@pytest.mark.parametrize("fmt", FORMATS)
def test_num_classes_reads_no_value_and_no_label(tmp_path, fmt):
    pred, lab = tmp_path / "pred", tmp_path / "labels"
    pred.mkdir()
    lab.mkdir()
    arr = np.random.default_rng(0).normal(size=(5, 6, 7)).astype(np.float32)
    for stem in ("a", "b"):
        save(pred / stem, arr, fmt)
        (lab / f"{stem}.png").write_bytes(b"not a png")  # a label that cannot be decoded
    folder = PredictionFolder(pred, lab)
    assert folder.num_classes == 5
    with pytest.raises(InputError, match=r"a\.png"):
        folder.read(folder.items[0])


def test_num_classes_of_an_nnunet_case_and_of_a_damaged_member(tmp_path):
    pred = tmp_path / "pred"
    pred.mkdir()
    probs = np.full((3, 20, 30, 40), 1 / 3, dtype=np.float32)  # larger than one read of the zip member
    np.savez(pred / "case_000.npz", probabilities=probs)  # stored: the member's bytes are the array's
    with open(pred / "case_000.pkl", "wb") as fh:
        pickle.dump({"spacing": [1.0, 1.0, 1.0]}, fh)
    assert PredictionFolder(pred).num_classes == 3
    data = bytearray((pred / "case_000.npz").read_bytes())
    i = data.index(probs.tobytes()[:64]) + 200  # a byte of the values, after the .npy header
    data[i] ^= 0xFF
    (pred / "case_000.npz").write_bytes(bytes(data))
    assert prediction_shape(pred / "case_000.npz") == (3, 20, 30, 40)  # the header alone
    with pytest.raises(InputError, match="case_000"):
        PredictionFolder(pred).read(PredictionFolder(pred).items[0])


def test_a_prediction_header_of_integers_or_one_axis_is_refused(tmp_path):
    np.save(tmp_path / "i.npy", np.zeros((3, 4), np.int32))
    np.savez(tmp_path / "v.npz", logits=np.zeros(4, np.float32))
    np.savez(tmp_path / "k.npz", other=np.zeros((3, 4), np.float32))
    with pytest.raises(InputError, match=r"i\.npy holds int32"):
        prediction_shape(tmp_path / "i.npy")
    with pytest.raises(InputError, match=r"v\.npz has shape \(4,\)"):
        prediction_shape(tmp_path / "v.npz")
    with pytest.raises(InputError, match=r"k\.npz has no 'logits' or 'probabilities'"):
        prediction_shape(tmp_path / "k.npz")


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["png-L", "png-I;16", "png-1", "npy-u1", "npy-i2", "npy-i8", "npy-bool", "nii-u1",
                             "nii-i2"]), flip=st.one_of(st.none(), st.integers(0, 10**6)))
def test_fuzz_label_dtype_is_the_stored_dtype_or_an_input_error(tmp_path_factory, kind, flip):
    """:func:`segcal.io.arrays.label_dtype` (the range an ``--ignore-index`` is checked against) from
    the header only: the dtype ``read_label`` reads (a 1-bit map / bool as uint8), or an InputError
    naming the file for a damaged one."""
    from PIL import Image

    from segcal.io.arrays import label_dtype, read_label

    root = tmp_path_factory.mktemp("lab")
    y = (np.arange(48).reshape(6, 8) % 3).astype(np.uint8)
    fmt, spec = kind.split("-", 1)
    if fmt == "png":
        path = root / "y.png"
        img = {"L": Image.fromarray(y), "I;16": Image.fromarray(y.astype(np.uint16)),
               "1": Image.fromarray(y > 0).convert("1")}[spec]
        img.save(path)
        want = np.dtype(np.uint16) if spec == "I;16" else np.dtype(np.uint8)
    elif fmt == "npy":
        path = root / "y.npy"
        dtype = np.dtype(bool) if spec == "bool" else np.dtype(spec)
        np.save(path, y.astype(dtype))
        want = np.dtype(np.uint8) if spec == "bool" else dtype
    else:
        nib = pytest.importorskip("nibabel")
        path = root / "y.nii.gz"
        nib.save(nib.Nifti1Image(y[..., None].astype(spec), np.eye(4)), str(path))
        want = np.dtype(spec)
    if flip is None:
        assert label_dtype(path) == want
        stored = read_label(path).dtype
        assert stored == want or (want == np.uint16 and stored == np.int32)  # read_label widens uint16
        return
    damage(path, None, flip)
    try:
        got = label_dtype(path)
    except InputError as exc:
        assert path.name in str(exc)
    else:  # a damaged file whose header still reads: some dtype (the values are checked on read)
        assert isinstance(got, np.dtype)
