"""``effkern bench patch_embed``: variable-patch-size patch embedding fused
with token dropout, against the unfused compositions people use today.

Implementations, all on the same inputs and the same kept patches:
  effkern  effkern.ops.patch_embed(images, w, b, p, pos, keep_idx, cu_seqlens)
           (Triton on CUDA; the PyTorch reference on CPU unless forced)
  timm     conv2d with timm's cached PI-resized weight
           (PatchEmbedResamplerFixedOrigSize) -> flatten -> + resample_abs_pos_embed
           -> PatchDropout-style torch.gather of the kept tokens
  unfold   F.unfold -> gather kept patches -> one matmul (+ bias + pos rows)

Shapes (CUDA default): ViT-B (D=768, p0=16, pos grid 14x14), batch 256, bf16;
224 px for p in {16, 32}, 240 px for p in {24, 48}; keep in {1.0, 0.75, 0.5,
0.25}; forward and forward+backward (grads for weight, bias, pos; images are
data).  CPU default (reduced, well under a minute): batch 8, fp32, 224/p16 and
240/p24, keep in {1.0, 0.5}.

Memory-bound floor: the bytes that must move, read/written once -- forward:
kept image pixels + packed tokens (+ weight); forward+backward adds the
gradient read and the kept pixels read again (+ dW written).  % roof =
floor time at the measured copy bandwidth / measured time.  TFLOP/s counts
2*T*D*K for the forward and again for dW.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from effkern.bench.common import Row, comma_list, int_at_least, keep_ratio, measured_copy_bandwidth, rel_err, time_fn

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _config(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.lower().split("x"))


def _config_ok(config: tuple[int, ...]) -> bool:
    return len(config) == 2 and config[1] >= 1 and config[0] >= config[1] and config[0] % config[1] == 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=int_at_least(1), default=None, help="images per batch (CUDA 256, CPU 8)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="CUDA bf16, CPU fp32")
    parser.add_argument("--dim", type=int_at_least(1), default=768, help="embedding dim D (ViT-B: 768)")
    parser.add_argument("--configs", type=comma_list(_config, "IMGxP with P >= 1 dividing IMG", _config_ok),
                        default=None,
                        help="comma list of IMGxP, e.g. 224x16,240x24 (CUDA: 224x16,224x32,240x24,240x48)")
    parser.add_argument("--keeps", type=comma_list(float, "a keep ratio in (0, 1]", keep_ratio), default=None,
                        help="comma list of keep ratios (CUDA 1,0.75,0.5,0.25; CPU 1,0.5)")
    parser.add_argument("--modes", type=comma_list(str, "fwd or fwdbwd", ("fwd", "fwdbwd").__contains__),
                        default="fwd,fwdbwd", help="fwd and/or fwdbwd")
    parser.add_argument("--no-peers", action="store_true", help="time effkern only")


def _defaults(args, device: torch.device):
    gpu = device.type == "cuda"
    batch = args.batch or (256 if gpu else 8)
    dtype = DTYPES[args.dtype or ("bf16" if gpu else "fp32")]
    configs = args.configs or ("224x16,224x32,240x24,240x48" if gpu else "224x16,240x24")
    configs = [_config(c) for c in configs.split(",")]
    keeps = [float(k) for k in (args.keeps or ("1,0.75,0.5,0.25" if gpu else "1,0.5")).split(",")]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    return batch, dtype, configs, keeps, modes


def _peers(w, b, pos, p, grid, keep_idx, B, n):
    from timm.layers import resample_abs_pos_embed
    from timm.layers.patch_embed import PatchEmbedResamplerFixedOrigSize

    from effkern.reference.patch_embed import resize_weight

    resampler = PatchEmbedResamplerFixedOrigSize((w.shape[-1], w.shape[-1]))
    idx = keep_idx.reshape(B, n)
    D = w.shape[0]

    def timm_fn(x):
        wp = resampler(w, [p, p]) if p != w.shape[-1] else w
        y = F.conv2d(x, wp, b, stride=p).flatten(2).transpose(1, 2)
        y = y + resample_abs_pos_embed(pos, list(grid), num_prefix_tokens=0)
        return torch.gather(y, 1, idx.unsqueeze(-1).expand(-1, -1, D))

    def unfold_fn(x):
        w2 = resize_weight(w, p)
        cols = F.unfold(x, p, stride=p).transpose(1, 2)  # (B, N, K)
        cols = torch.gather(cols, 1, idx.unsqueeze(-1).expand(-1, -1, cols.shape[-1]))
        from effkern.reference.patch_embed import resize_pos

        posr = resize_pos(pos, grid)
        return torch.addmm(b, cols.reshape(B * n, -1), w2.t()).reshape(B, n, D) + posr[idx]

    return {"timm": timm_fn, "unfold": unfold_fn}


def run(args) -> list[Row]:
    from effkern.backend import select
    from effkern.ops import patch_embed, sample_keep
    from effkern.reference import patch_embed as ref

    device = torch.device(args.device)
    batch, dtype, configs, keeps, modes = _defaults(args, device)
    repeat = args.repeat
    warmup = 3 if device.type == "cuda" else 1
    bw = measured_copy_bandwidth(device, nbytes=(1 << 28) if device.type == "cuda" else (1 << 25))
    backend = select(device, {"triton", "reference"})
    gen = torch.Generator(device="cpu").manual_seed(0)
    D, p0, g0, C = args.dim, 16, 14, 3
    elt = torch.tensor([], dtype=dtype).element_size()
    rows: list[Row] = []
    for img, p in configs:
        if img % p:
            continue
        grid = (img // p, img // p)
        N = grid[0] * grid[1]
        x = torch.randn(batch, C, img, img, generator=gen).to(device, dtype)
        w = (torch.randn(D, C, p0, p0, generator=gen) * 0.02).to(device, dtype).requires_grad_()
        b = (torch.randn(D, generator=gen) * 0.02).to(device, dtype).requires_grad_()
        pos = (torch.randn(1, g0 * g0, D, generator=gen) * 0.02).to(device, dtype).requires_grad_()
        K = C * p * p
        for keep in keeps:
            n = max(1, int(N * keep))
            keep_idx, cu = sample_keep(batch, N, keep, generator=gen)
            keep_idx, cu = keep_idx.to(device), cu.to(device)
            T = batch * n
            ours = lambda x: patch_embed(x, w, b, p, pos, keep_idx, cu)  # noqa: E731
            impls = {"effkern": ours}
            if not args.no_peers:
                impls.update(_peers(w, b, pos, p, grid, keep_idx, batch, n))
            # accuracy vs a float64 evaluation of the same math
            with torch.no_grad():
                exp = ref.patch_embed_fwd(x.double(), ref.resize_weight(w.double(), p), b.double(),
                                          ref.resize_pos(pos.double(), grid), ref.flat_index(keep_idx, cu, N), p)
                errs = {name: rel_err(fn(x).reshape(T, D), exp) for name, fn in impls.items()}
            del exp
            kept_img_bytes = batch * C * img * img * elt * (n / N)
            tok_bytes = T * D * elt
            w_bytes = D * K * elt
            for mode in modes:
                if mode == "fwd":
                    fns = {k: (lambda f=f: f(x)) for k, f in impls.items()}
                    ctx = torch.no_grad
                    floor_bytes = kept_img_bytes + tok_bytes + w_bytes
                    flops = 2.0 * T * D * K
                elif mode == "fwdbwd":
                    g = torch.randn(T, D, generator=gen).to(device, dtype)

                    def make(f):
                        def step():
                            out = f(x).reshape(T, D)
                            torch.autograd.backward(out, g, inputs=[w, b, pos])
                        return step

                    fns = {k: make(f) for k, f in impls.items()}
                    ctx = torch.enable_grad
                    floor_bytes = 2 * kept_img_bytes + 2 * tok_bytes + 2 * w_bytes
                    flops = 4.0 * T * D * K
                else:
                    raise ValueError(f"unknown mode {mode!r} (fwd, fwdbwd)")
                with ctx():
                    times = {k: time_fn(fn, device, warmup=warmup, repeat=repeat) for k, fn in fns.items()}
                for p_ in (w, b, pos):
                    p_.grad = None
                floor_ms = floor_bytes / (bw * 1e9) * 1e3
                shape = f"{mode} B{batch} {img}px p{p} keep{keep:g} D{D} T{T}"
                for name, ms in times.items():
                    row = Row(op=f"patch_embed {mode}", shape=shape, impl=name, dtype=str(dtype).replace("torch.", ""),
                              ms=ms, gbps=floor_bytes / (ms * 1e-3) / 1e9, tflops=flops / (ms * 1e-3) / 1e12,
                              roofline_pct=100.0 * floor_ms / ms, rel_err=errs[name],
                              extra={"backend": backend if name == "effkern" else "torch", "copy_gbps": bw,
                                     "floor_bytes": floor_bytes})
                    if name == "effkern":
                        row.ratios = {peer: times[peer] / ms for peer in times if peer != "effkern"}
                    rows.append(row)
    return rows
