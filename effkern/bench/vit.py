"""``effkern bench vit``: a whole ViT training step (forward + ``loss.backward()``, no
optimizer) with the timm drop-in (``effkern.timm.patch``) against plain timm.

Implementations, same weights (random init, ``pretrained=False``), random images:
  timm     the unpatched timm VisionTransformer (timm's fused attention = torch SDPA),
           on all patches of the native patch size.  Multi-view peers call it once
           per view (MoCo) or once per resolution group, all crops of one size
           concatenated, as DINO's MultiCropWrapper does (the 96 px local crops use
           a copy built with ``dynamic_img_size=True``, which resamples pos_embed).
  effkern  the patched model: ``model(x, patch_size=p, keep=r)`` (kept patches drawn
           inside the step with effkern.ops.sample_keep) or ``forward_views`` (all
           views as ONE packed batch).

Settings per model: p16 keep 1 (the packed path at timm's work), keep {0.75, 0.5,
0.25}, patch {24, 32} (keep 1; image = the largest multiple of p <= img, e.g. 216 px
for p24 at 224), MoCo two views (packed keep 1 and keep 0.5 per view, vs two timm
calls), DINO multi-crop 2 x img + 8 x local (packed vs two grouped timm calls).

Columns: ms per step (median); ``vs timm`` = measured speedup = timm_ms / ms against
the setting's timm peer (the single-view timm row, or the per-view timm row of the
multi-view setting); extra: images/s (= batch / step time; one image = all its
views), peak memory (torch.cuda.max_memory_allocated of the step; None on CPU),
predicted_speedup from the FLOP cost model and measured/predicted.

Cost model (forward FLOPs, a training step is ~3x that, so ratios are equal):
per image and view, n kept patches, N = n + prefix tokens, depth blocks:
    2 n C p^2 D  +  depth * (2 N (4 D^2 + 2 mlp_ratio D^2) + 4 N^2 D)
(patch-embedding matmul; qkv + proj + MLP matmuls; QK^T and PV).  The classifier
head, norms and elementwise ops are ignored.  TFLOP/s column: 3 x forward FLOPs / time.

CUDA default: ViT-S/16 and ViT-B/16, batch 256, bf16 autocast, 224 px.  CPU default
(reduced, well under a minute): a depth-2 ViT-Ti/16 at 96 px (local crops 48 px),
batch 4, fp32, settings p16 keep {1, 0.5, 0.25}, p32, MoCo, DINO.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math

import torch

from effkern.bench.common import Row, comma_list, int_at_least, keep_ratio, time_fn

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MODELS = {
    "vit_s16": ("vit_small_patch16_224", {}),
    "vit_b16": ("vit_base_patch16_224", {}),
    "vit_ti16_d2": ("vit_tiny_patch16_224", {"depth": 2}),
}
# extra keys shown as table columns by ``effkern bench`` (see common.format_table)
TABLE_EXTRA = ("images_per_s", "peak_mem_mib", "predicted_speedup", "measured/predicted")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=int_at_least(1), default=None, help="images per step (CUDA 256, CPU 4)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="autocast dtype; fp32 = no autocast (CUDA bf16, CPU fp32)")
    parser.add_argument("--models", type=comma_list(str, f"one of {', '.join(MODELS)}", MODELS.__contains__),
                        default=None,
                        help=f"comma list of {','.join(MODELS)} (CUDA vit_s16,vit_b16; CPU vit_ti16_d2)")
    parser.add_argument("--img", type=int_at_least(1), default=None, help="image size (CUDA 224, CPU 96)")
    parser.add_argument("--keeps", type=comma_list(float, "a keep ratio in (0, 1]", keep_ratio), default=None,
                        help="keep ratios at p16 (CUDA 1,0.75,0.5,0.25; CPU 1,0.5,0.25)")
    parser.add_argument("--patches", type=comma_list(int, "a patch size >= 1", lambda p: p >= 1), default=None,
                        help="patch sizes at keep 1 (CUDA 24,32; CPU 32)")
    parser.add_argument("--no-multiview", action="store_true", help="skip the MoCo and DINO settings")
    parser.add_argument("--seed", type=int, default=0)


def _defaults(args, device) -> None:
    gpu = device.type == "cuda"
    args.batch = args.batch or (256 if gpu else 4)
    args.dtype_t = DTYPES[args.dtype or ("bf16" if gpu else "fp32")]
    args.img = args.img or (224 if gpu else 96)
    args.models_list = (args.models or ("vit_s16,vit_b16" if gpu else "vit_ti16_d2")).split(",")
    args.keeps_list = [float(k) for k in (args.keeps or ("1,0.75,0.5,0.25" if gpu else "1,0.5,0.25")).split(",")]
    args.patches_list = [int(p) for p in (args.patches or ("24,32" if gpu else "32")).split(",") if p]
    for m in args.models_list:
        if m not in MODELS:
            raise ValueError(f"unknown model {m!r}; one of {', '.join(MODELS)}")


# ---------------------------------------------------------------- cost model

def _arch(model) -> dict:
    D = model.embed_dim
    return {"C": model.patch_embed.proj.in_channels, "D": D, "depth": len(model.blocks),
            "prefix": model.num_prefix_tokens, "mlp": model.blocks[0].mlp.fc1.out_features / D}


def fwd_flops(arch: dict, img: int, p: int, keep: float | None = None) -> float:
    """Forward FLOPs of one image view (the cost model above)."""
    n_all = (img // p) ** 2
    n = n_all if keep is None else max(1, int(n_all * keep))
    N, D = n + arch["prefix"], arch["D"]
    embed = 2 * n * arch["C"] * p * p * D
    block = 2 * N * (4 * D * D + 2 * arch["mlp"] * D * D) + 4 * N * N * D
    return embed + arch["depth"] * block


# ---------------------------------------------------------------- steps

def _autocast(device, dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _loss(outs) -> torch.Tensor:
    outs = outs if isinstance(outs, (list, tuple)) else [outs]
    return sum(o.float().square().mean() for o in outs)


def _make_step(model, fn, device, dtype):
    def step():
        model.zero_grad(set_to_none=True)
        with _autocast(device, dtype):
            loss = _loss(fn())
        loss.backward()
        return loss
    return step


def _images(batch, img, device, gen):
    return torch.randn(batch, 3, img, img, generator=gen).to(device)


def _measure(step, device, repeat) -> tuple[float, float | None]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    ms = time_fn(step, device, warmup=2, repeat=repeat)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return ms, peak


def _row(model_name, shape, impl, args, ms, peak, flops_fwd, base_ms=None, pred=None, extra=None) -> Row:
    dtype = str(args.dtype_t).replace("torch.", "")
    row = Row("vit_train_step", shape, impl, dtype, ms, tflops=3 * flops_fwd / (ms * 1e-3) / 1e12,
              extra={"images_per_s": args.batch / (ms * 1e-3), "peak_mem_mib": peak, "model": model_name,
                     **(extra or {})})
    if base_ms is not None:
        measured = base_ms / ms
        row.ratios = {"timm": measured}
        row.extra["predicted_speedup"] = pred
        row.extra["measured/predicted"] = measured / pred
    return row


def _safe(rows, model_name, shape, impl, args, fn):
    """Run one measurement; a failure (e.g. out of memory) becomes a NaN row with the error."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - reported in the table, never hidden
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        rows.append(Row("vit_train_step", shape, impl, str(args.dtype_t).replace("torch.", ""), float("nan"),
                        extra={"model": model_name, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}))
        return None


def _model_rows(args, device, model_name, gen) -> list[Row]:
    import timm

    import effkern.timm as et

    arch_name, kw = MODELS[model_name]
    B, img, dtype = args.batch, args.img, args.dtype_t
    base = timm.create_model(arch_name, pretrained=False, img_size=img, **kw).to(device).train()
    patched = et.patch(copy.deepcopy(base))
    arch = _arch(base)
    p0 = base.patch_embed.proj.kernel_size[0]
    tag = f"{model_name} b{B}"
    rows: list[Row] = []
    x = _images(B, img, device, gen)

    # single view: timm baseline, then the packed path
    base_fwd = fwd_flops(arch, img, p0)
    res = _safe(rows, model_name, f"{tag} p{p0} timm", "timm", args,
                lambda: _measure(_make_step(base, lambda: base(x), device, dtype), device, args.repeat))
    base_ms = None
    if res:
        base_ms = res[0]
        rows.append(_row(model_name, f"{tag} p{p0}", "timm", args, res[0], res[1], base_fwd))
    settings = [(p0, k) for k in args.keeps_list] + [(p, 1.0) for p in args.patches_list if p != p0]
    for p, k in settings:
        size = img - img % p
        xs = x if size == img else _images(B, size, device, gen)
        shape = f"{tag}{'' if size == img else f' {size}px'} p{p} keep{k:g}"
        f = fwd_flops(arch, size, p, k)

        def run_one(xs=xs, p=p, k=k):
            return _measure(_make_step(patched, lambda: patched(xs, patch_size=p, keep=k), device, dtype),
                            device, args.repeat)
        res = _safe(rows, model_name, shape, "effkern", args, run_one)
        if res:
            rows.append(_row(model_name, shape, "effkern", args, res[0], res[1], f,
                             base_ms=base_ms, pred=base_fwd / f if base_ms else None,
                             extra={"tokens_per_image": max(1, int((size // p) ** 2 * k)) + arch["prefix"]}))
    if args.no_multiview:
        return rows

    # MoCo-style: two views at img; timm = one call per view
    x2 = _images(B, img, device, gen)
    moco_base = 2 * base_fwd
    res = _safe(rows, model_name, f"{tag} moco 2x{img}", "timm", args, lambda: _measure(_make_step(
        base, lambda: [base.forward_head(base.forward_features(v), pre_logits=True) for v in (x, x2)],
        device, dtype), device, args.repeat))
    moco_ms = res[0] if res else None
    if res:
        rows.append(_row(model_name, f"{tag} moco 2x{img} per-view", "timm", args, res[0], res[1], moco_base,
                         extra={"views": 2}))
    for k in (1.0, 0.5):
        shape = f"{tag} moco 2x{img} packed keep{k:g}"
        f = 2 * fwd_flops(arch, img, p0, k)
        res = _safe(rows, model_name, shape, "effkern", args, lambda k=k: _measure(_make_step(
            patched, lambda: patched.forward_views([x, x2], keeps=[k, k]), device, dtype), device, args.repeat))
        if res:
            rows.append(_row(model_name, shape, "effkern", args, res[0], res[1], f, base_ms=moco_ms,
                             pred=moco_base / f if moco_ms else None, extra={"views": 2}))

    # DINO multi-crop: 2 global (img) + 8 local crops; timm = one call per resolution group
    local = max(p0, round(img * 96 / 224 / p0) * p0)
    g_views = [x, x2]
    l_views = [_images(B, local, device, gen) for _ in range(8)]
    dino_base = 2 * base_fwd + 8 * fwd_flops(arch, local, p0)
    dyn = timm.create_model(arch_name, pretrained=False, img_size=img, dynamic_img_size=True, **kw)
    dyn.load_state_dict(base.state_dict())
    dyn = dyn.to(device).train()
    g_cat, l_cat = torch.cat(g_views), torch.cat(l_views)
    shape = f"{tag} dino 2x{img}+8x{local}"
    res = _safe(rows, model_name, shape, "timm", args, lambda: _measure(_make_step(
        dyn, lambda: [dyn.forward_head(dyn.forward_features(v), pre_logits=True) for v in (g_cat, l_cat)],
        device, dtype), device, args.repeat))
    dino_ms = res[0] if res else None
    if res:
        rows.append(_row(model_name, shape + " per-res", "timm", args, res[0], res[1], dino_base,
                         extra={"views": 10}))
    res = _safe(rows, model_name, shape + " packed", "effkern", args, lambda: _measure(_make_step(
        patched, lambda: patched.forward_views(g_views + l_views), device, dtype), device, args.repeat))
    if res:
        rows.append(_row(model_name, shape + " packed", "effkern", args, res[0], res[1], dino_base,
                         base_ms=dino_ms, pred=1.0 if dino_ms else None, extra={"views": 10}))
    return rows


def run(args) -> list[Row]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    _defaults(args, device)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    rows: list[Row] = []
    for name in args.models_list:
        rows += _model_rows(args, device, name, gen)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    assert all(math.isfinite(r.ms) or "error" in r.extra for r in rows)
    return rows
