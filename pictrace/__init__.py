"""PicTrace: reverse image search over a gallery (embedding + SSIM + ORB, fused)."""

__version__ = "1.0.0"
