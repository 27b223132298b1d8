"""effkern bench fft_crop: the low-frequency crop against the peers a user would pick.

Peers, measured in the same process on the same inputs:
  torch.fft     rfft2 -> keep the low rows/columns -> irfft2 at (h, w), rescaled:
                the fast composition.  The definition keeps rows -h/2..h/2-1 of
                every column, which is not Hermitian for even h; the real output
                equals irfft2 of the Hermitian part, which differs from the plain
                crop only in row -h/2: the mean of frequencies -h/2 and +h/2
                (for even w, in the Nyquist column, frequency +h/2 alone).  The
                peer sets that row (one extra small copy), so it is exact.
  fft2+shift    fft2 -> fftshift -> centre crop -> ifftshift -> ifft2 -> real part:
                EfficientTrain++'s own code, exactly the definition
  interpolate   F.interpolate(mode="bilinear", antialias=True): the down-sampling
                alternative (a different operator: its error column is not ~0)
On CPU the C++ kernel picks its algorithm per shape (FFT path or GEMM path,
recorded in the JSON as effkern_cpu_algorithm).
Columns: median ms; GB/s = (input bytes + output bytes) / time; % roof = that
over the device bandwidth measured in this run (a large copy; on CPU a memcpy
of the same size); rel err vs the float64 torch.fft oracle on the first images;
"vs X" = X's time / ours (>1: effkern is faster).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from effkern import _native
from effkern.bench.common import Row, int_at_least, measured_copy_bandwidth, rel_err, time_fn
from effkern.ops import fft_crop

GPU_BATCH, CPU_BATCH = 256, 64
SIZES = (96, 128, 160, 192)
DTYPE_NAMES = ("float32", "bfloat16", "float16", "float64")


def add_arguments(parser) -> None:
    parser.add_argument("--batch", type=int_at_least(1), default=None,
                        help=f"images (default {GPU_BATCH} GPU, {CPU_BATCH} CPU)")
    parser.add_argument("--res", type=int_at_least(1), default=224, help="input resolution H = W")
    parser.add_argument("--sizes", type=int_at_least(1), nargs="+", default=list(SIZES), help="crop sizes")
    parser.add_argument("--dtypes", nargs="+", choices=DTYPE_NAMES, default=None,
                        help="float32 bfloat16 ... (default: fp32, +bf16 on GPU)")


def torch_fft_crop(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """rfft2 -> low-frequency rows/columns -> irfft2: the peer implementation."""
    H, W = x.shape[-2:]
    spec = torch.fft.rfft2(x.float() if x.dtype in (torch.float16, torch.bfloat16) else x)
    rows = torch.cat([spec[..., : (h + 1) // 2, : w // 2 + 1], spec[..., H - h // 2:, : w // 2 + 1]], dim=-2)
    if h % 2 == 0 and h < H:
        rows[..., h // 2, :] = 0.5 * (spec[..., H - h // 2, : w // 2 + 1] + spec[..., h // 2, : w // 2 + 1])
        if w % 2 == 0:  # the Nyquist column stands for -w/2, whose rows mirror to +h/2
            rows[..., h // 2, w // 2] = spec[..., h // 2, w // 2]
    out = torch.fft.irfft2(rows, s=(h, w)) * (h * w / (H * W))
    return out.to(x.dtype)


def official_crop(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """EfficientTrain++'s frequency crop as published (complex fft2 with shifts)."""
    H, W = x.shape[-2:]
    spec = torch.fft.fftshift(torch.fft.fft2(x.float() if x.dtype in (torch.float16, torch.bfloat16) else x),
                              dim=(-2, -1))
    top, left = H // 2 - h // 2, W // 2 - w // 2
    crop = spec[..., top:top + h, left:left + w]
    out = torch.fft.ifft2(torch.fft.ifftshift(crop, dim=(-2, -1))).real * (h * w / (H * W))
    return out.to(x.dtype)


def interpolate_crop(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)


def _oracle(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return official_crop(x.double(), h, w)


def run(args) -> list[Row]:
    device = torch.device(args.device)
    batch = args.batch or (GPU_BATCH if device.type == "cuda" else CPU_BATCH)
    dtypes = args.dtypes or (["float32", "bfloat16"] if device.type == "cuda" else ["float32"])
    res = args.res
    bandwidth = measured_copy_bandwidth(device, nbytes=batch * 3 * res * res * 4)
    rows: list[Row] = []
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        x = torch.randn(batch, 3, res, res, device=device).to(dtype)
        check = x[:2]
        for size in args.sizes:
            nbytes = x.numel() * x.element_size() + batch * 3 * size * size * x.element_size()
            ref = _oracle(check, size, size)
            impls = {
                "effkern": lambda: fft_crop(x, size),
                "torch.fft": lambda: torch_fft_crop(x, size, size),
                "fft2+shift": lambda: official_crop(x, size, size),
                "interpolate": lambda: interpolate_crop(x, size, size),
            }
            errs = {
                "effkern": rel_err(fft_crop(check, size), ref),
                "torch.fft": rel_err(torch_fft_crop(check, size, size), ref),
                "fft2+shift": rel_err(official_crop(check, size, size), ref),
                "interpolate": rel_err(interpolate_crop(check, size, size), ref),
            }
            times = {name: time_fn(fn, device, warmup=2, repeat=args.repeat) for name, fn in impls.items()}
            shape = f"({batch},3,{res},{res})->{size}"
            extra = {"copy_bandwidth_gbps": bandwidth}
            if device.type == "cpu" and _native.has_cpu_kernels():
                extra["effkern_cpu_algorithm"] = _native._C.fft_crop_cpu_algorithm(res, res, size, size)
            for name, ms in times.items():
                gbps = nbytes / (ms * 1e-3) / 1e9
                ratios = {p: times[p] / ms for p in times if p != name} if name == "effkern" else {}
                rows.append(Row(op="fft_crop", shape=shape, impl=name, dtype=dtype_name, ms=ms, gbps=gbps,
                                roofline_pct=100 * gbps / bandwidth, rel_err=errs[name], ratios=ratios,
                                extra=dict(extra) if name == "effkern" else {"copy_bandwidth_gbps": bandwidth}))
    return rows
