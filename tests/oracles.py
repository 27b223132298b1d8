"""Float64 oracles, written independently of effkern's implementations."""

from __future__ import annotations

import torch

from effkern.bench.common import rel_err  # noqa: F401  (the one relative-error measure; re-exported)


def fft_crop_oracle(x: torch.Tensor, size, mean=None, std=None) -> torch.Tensor:
    """EfficientTrain's frequency crop: fftshift, centre crop (h, w), ifftshift,
    ifft2, real part, scale by h*w/(H*W); then the optional normalisation."""
    h, w = size
    H, W = x.shape[-2:]
    xd = x.double()
    if not x.dtype.is_floating_point:
        xd = xd / 255.0
    spec = torch.fft.fftshift(torch.fft.fft2(xd), dim=(-2, -1))
    top, left = H // 2 - h // 2, W // 2 - w // 2
    crop = spec[..., top:top + h, left:left + w]
    y = torch.fft.ifft2(torch.fft.ifftshift(crop, dim=(-2, -1))).real * (h * w) / (H * W)
    if mean is not None:
        y = (y - mean.double().reshape(-1, 1, 1)) / std.double().reshape(-1, 1, 1)
    return y
