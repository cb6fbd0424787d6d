"""Render one CamVid image under every segcal.shift corruption at severities 1, 3 and 5.

Usage::

    python3 benchmarks/shift_gallery.py [OUT.png] [--image PATH] [--seed N] [--severities 1 3 5]

Writes a PNG grid (rows: corruptions; columns: clean + the severities) to OUT.png (default
``/tmp/shift_gallery.png``; never into the repository). The default image is the first test
image of ``<data root>/camvid/test`` (see :mod:`segcal.data`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from segcal.data import data_root
from segcal.shift import available_corruptions, corrupt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", default="/tmp/shift_gallery.png", help="output PNG path")
    ap.add_argument("--image", default=None, help="RGB image (default: first CamVid test image)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--severities", type=int, nargs="+", default=[1, 3, 5])
    ap.add_argument("--names", nargs="+", default=None, help="subset of corruptions")
    ap.add_argument("--dpi", type=int, default=110)
    args = ap.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if args.image is None:
        root = data_root(required=True)
        args.image = sorted((root / "camvid" / "test").glob("*.png"))[0]
    img = np.asarray(Image.open(args.image).convert("RGB"))
    names = args.names or available_corruptions()
    cols = 1 + len(args.severities)
    h, w = img.shape[:2]
    cw = 2.6
    fig, axes = plt.subplots(
        len(names), cols, figsize=(cw * cols, cw * h / w * len(names) * 1.08), squeeze=False
    )
    for r, name in enumerate(names):
        panels = [("clean", img)] + [
            (f"sev {s}", corrupt(img, name, s, seed=args.seed)) for s in args.severities
        ]
        for c, (title, im) in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(im, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{name} {title}" if c else title, fontsize=7)
    fig.suptitle(f"segcal.shift on {Path(args.image).name} (seed {args.seed})", fontsize=9)
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=args.dpi)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
