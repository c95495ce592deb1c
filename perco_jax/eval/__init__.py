"""Evaluation: image-quality and distribution metrics (`metrics.py`: PSNR, MS-SSIM, FID / KID
statistics) and, in `perco_jax.models.lpips`, the LPIPS network.

Pixel metrics take NHWC float batches in [0, 1] and return one value per image; distribution
metrics take feature matrices [N, D] and are computed in float64 numpy, as the reference tools do.
"""
