#!/usr/bin/env python3
"""Train the reference 3D U-Net on MSD hippocampus (thin wrapper of segcal.pipeline.train_unet3d)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from segcal.pipeline.train_unet3d import main

if __name__ == "__main__":
    sys.exit(main())
