"""Trust audit, second part (session 27): outputs that disagreed with each other or with the
arguments, each case failing on the code before its fix.

* ``segcal eval --json``: ``iou_per_class`` (and Dice, class-wise and class-level ECE) held the
  ignore channel's computed 0.0 while the printed table said ``n/a``: the mean of the list was
  not the ``miou`` beside it. Now NaN (``null``) wherever the table says ``n/a``, in the JSON, the
  HTML report and the API (:func:`segcal.metrics.scores.compute_from_state`).

Every expected figure is recomputed with NumPy in the test (``metric_reference``).
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from metric_reference import reference_metrics, softmax
from segcal.cli import main


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def strict(path):
    def refuse(token):
        raise AssertionError(f"{path.name}: {token} is not JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


def void_channel_folder(root, n=3, c=4, shape=(6, 7), seed=0):
    """``n`` logit files of ``c`` channels whose last channel is void (its label value is the ignore
    index, ``c - 1``, as CamVid's 12-output ESPNet with void = 11); returns folders, logits, labels."""
    rng = np.random.default_rng(seed)
    pred, lab = root / "pred", root / "labels"
    pred.mkdir(parents=True)
    lab.mkdir()
    zs, ys = [], []
    for i in range(n):
        z = (2 * rng.normal(size=(c, *shape))).astype(np.float32)
        z[c - 1, :2] += 4  # the void channel is predicted somewhere: its computed IoU is 0, not NaN
        y = np.where(rng.random(shape) < 0.6, z.argmax(0), rng.integers(0, c, shape)).astype(np.uint8)
        y[-1] = c - 1
        np.save(pred / f"s{i}.npy", z)
        np.save(lab / f"s{i}.npy", y)
        zs.append(z)
        ys.append(y)
    return pred, lab, np.stack(zs), np.stack(ys)


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
