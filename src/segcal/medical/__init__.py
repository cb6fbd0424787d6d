"""Medical 3D segmentation: the reference 3D U-Net on MSD hippocampus and nnU-Net v2 interop."""
