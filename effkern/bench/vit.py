"""``effkern bench vit``: a whole ViT training step (forward + ``loss.backward()``, no
optimizer) with the timm drop-in (``effkern.timm.patch``) against plain timm.

Implementations, same weights (random init, ``pretrained=False``), random images:
  timm     the unpatched timm VisionTransformer (timm's fused attention = torch SDPA),
           on all patches of the native patch size.  Multi-view peers: MoCo's two views
           once per view AND as one batch of 2B (the better of the two is the peer);
           DINO's crops once per resolution group, all crops of one size concatenated,
           as DINO's MultiCropWrapper does (the local crops use a copy built with
           ``dynamic_img_size=True``, which resamples pos_embed).
  effkern  the patched model: ``model(x, patch_size=p, keep=r)`` (kept patches drawn
           inside the step with effkern.ops.sample_keep) or ``forward_views`` (all
           views as ONE packed batch).

Settings per model: p16 keep 1 (the packed path at timm's work), the ``--keeps`` at the
native patch, the ``--patches`` at keep 1 (image = the largest multiple of p <= img,
e.g. 216 px for p24 at 224), the ``--combos`` patch:keep pairs, MoCo two views (packed
keep 1, and the asymmetric keeps 0.5 / 0.25), DINO multi-crop 2 x img + 8 x local
(packed at keep 1, and with the global crops at keep 0.5).

Timing: every setting of a model is warmed up (3 rounds: the heap reaches its steady
state, see effkern.cpu_allocator), then timed round-robin -- one step of
each setting per round, ``--repeat`` rounds -- so machine load hits all settings alike;
ms is the median, ``ms_min``/``ms_max`` the spread.  After the timing, one more step per
setting measures peak memory (CUDA peak allocated; on CPU the activations saved for the
backward) and, with ``--breakdown``, one profiled step splits its time into embed /
attention / matmul / norm_act / gather / other (effkern.bench._profile).

Columns: ``vs timm`` = measured speedup = peer ms / ms; ``predicted_speedup`` from the
FLOP cost model; ``measured/predicted``; images/s (one image = all its views).  ``vs timm
same tokens``: against timm doing the same token work its own way (PatchDropout at the
keep ratio; a model built at the other patch size with weights resampled once), so the
part of a shortfall from the prediction that timm shares (short sequences run the GEMMs
and the attention kernel less efficiently than the FLOP count says) is visible.

Cost model (forward FLOPs, a training step is ~3x that, so ratios are equal):
per image and view, n kept patches, N = n + prefix tokens, depth blocks:
    2 n C p^2 D  +  depth * (2 N (4 D^2 + 2 mlp_ratio D^2) + 4 N^2 D)
(patch-embedding matmul; qkv + proj + MLP matmuls; QK^T and PV).  The classifier
head, norms and elementwise ops are ignored.  TFLOP/s column: 3 x forward FLOPs / time.

CUDA default: ViT-S/16 and ViT-B/16, batch 256, bf16 autocast, 224 px.  CPU default:
ViT-Ti/16 at depth 6, 224 px (local crops 96 px), batch 32, fp32 -- a few minutes on 2
cores; ``--models vit_ti16_d2 --img 96 --batch 4`` is a quick look.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import statistics
import time

import torch

from effkern.bench.common import Row, comma_list, int_at_least, keep_ratio, report_partial, synchronize

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MODELS = {
    "vit_s16": ("vit_small_patch16_224", {}),
    "vit_b16": ("vit_base_patch16_224", {}),
    "vit_ti16_d6": ("vit_tiny_patch16_224", {"depth": 6}),
    "vit_ti16_d2": ("vit_tiny_patch16_224", {"depth": 2}),
}
BREAKDOWN = ("t_embed", "t_attention", "t_matmul", "t_norm_act", "t_gather", "t_other")
# extra keys shown as table columns by ``effkern bench`` (see common.format_table)
TABLE_EXTRA = ("ms_min", "ms_max", "images_per_s", "predicted_speedup", "measured/predicted",
               "peak_mem_mib") + BREAKDOWN


def _combo(text: str) -> bool:
    p, _, k = text.partition(":")
    try:
        return int(p) >= 1 and keep_ratio(float(k))
    except ValueError:
        return False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=int_at_least(1), default=None, help="images per step (CUDA 256, CPU 32)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="autocast dtype; fp32 = no autocast (CUDA bf16, CPU fp32)")
    parser.add_argument("--models", type=comma_list(str, f"one of {', '.join(MODELS)}", MODELS.__contains__),
                        default=None,
                        help=f"comma list of {','.join(MODELS)} (CUDA vit_s16,vit_b16; CPU vit_ti16_d6)")
    parser.add_argument("--img", type=int_at_least(1), default=None, help="image size (224)")
    parser.add_argument("--keeps", type=comma_list(float, "a keep ratio in (0, 1]", keep_ratio), default=None,
                        help="keep ratios at p16 (CUDA 1,0.75,0.5,0.25; CPU 1,0.5,0.25)")
    parser.add_argument("--patches", type=comma_list(int, "a patch size >= 1", lambda p: p >= 1), default=None,
                        help="patch sizes at keep 1 (24,32)")
    parser.add_argument("--combos", type=comma_list(str, "a patch:keep pair like 32:0.5", _combo), default=None,
                        help="patch:keep pairs (24:0.5,32:0.5)")
    parser.add_argument("--no-multiview", action="store_true", help="skip the MoCo and DINO settings")
    parser.add_argument("--breakdown", action="store_true", help="one profiled step per setting: time per part")
    parser.add_argument("--seed", type=int, default=0)


def _defaults(args, device) -> None:
    gpu = device.type == "cuda"
    args.batch = args.batch or (256 if gpu else 32)
    args.dtype_t = DTYPES[args.dtype or ("bf16" if gpu else "fp32")]
    args.img = args.img or 224
    args.models_list = (args.models or ("vit_s16,vit_b16" if gpu else "vit_ti16_d6")).split(",")
    args.keeps_list = [float(k) for k in (args.keeps or ("1,0.75,0.5,0.25" if gpu else "1,0.5,0.25")).split(",")]
    args.patches_list = [int(p) for p in (args.patches or "24,32").split(",") if p]
    args.combos_list = [(int(c.split(":")[0]), float(c.split(":")[1]))
                        for c in (args.combos or "24:0.5,32:0.5").split(",") if c]


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


class Setting:
    """One timed configuration: a step function, its forward FLOPs, its timm peers (the
    full-work ones the speedup is measured against, and timm at the same token count)."""

    def __init__(self, shape, impl, model, step, flops, peer=None, extra=None, same_tokens=None):
        self.shape, self.impl, self.model, self.step, self.flops = shape, impl, model, step, flops
        self.peer, self.extra, self.times, self.error = peer, dict(extra or {}), [], None
        self.same_tokens = same_tokens


def _same_tokens_peer(arch_name, kw, base, p, k, size, xs, device, step):
    """timm doing the same token work as ``patched(xs, patch_size=p, keep=k)``, the best
    timm itself offers: its PatchDropout (``patch_drop_rate=1-k``, training mode, the same
    max(1, int(n*k)) kept patches) and, for another patch size, a model built at that patch
    size with the weights resampled once (timm's resample_patch_embed / resample_abs_pos_embed;
    effkern instead resamples inside every step, as the base weights train).  None at the
    native patch size and keep 1 (that peer is timm itself)."""
    import timm
    from timm.layers import resample_abs_pos_embed, resample_patch_embed

    p0 = base.patch_embed.proj.kernel_size[0]
    if p == p0 and k >= 1.0:
        return None
    m = timm.create_model(arch_name, pretrained=False, img_size=size, patch_size=p,
                          patch_drop_rate=0.0 if k >= 1.0 else 1.0 - k, **kw)
    state = {name: t.clone() for name, t in base.state_dict().items()}
    if p != p0:
        state["patch_embed.proj.weight"] = resample_patch_embed(state["patch_embed.proj.weight"], [p, p])
    state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], [size // p, size // p],
                                                num_prefix_tokens=base.num_prefix_tokens)
    m.load_state_dict(state)
    m = m.to(device).train()
    what = "PatchDropout" if k < 1.0 else "at this patch"
    if p != p0 and k < 1.0:
        what = "at this patch + PatchDropout"
    return Setting(f"timm {what}", "timm", m, step(m, lambda: m(xs)), 0.0)


def time_interleaved(settings: list[Setting], device, repeat: int, warmup: int = 3) -> None:
    """Warm-up calls, then ``repeat`` rounds of one timed call per setting, in turn
    (milliseconds appended to ``setting.times``).  A setting that raises (e.g. out of
    memory) keeps its error and leaves the rotation."""
    for rnd in range(warmup + repeat):
        for s in settings:
            if s.error is not None:
                continue
            try:
                synchronize(device)
                t0 = time.perf_counter()
                s.step()
                synchronize(device)
                if rnd >= warmup:
                    s.times.append((time.perf_counter() - t0) * 1e3)
            except Exception as exc:  # noqa: BLE001 - reported in the table, never hidden
                s.error = f"{type(exc).__name__}: {str(exc)[:200]}"
                if device.type == "cuda":
                    torch.cuda.empty_cache()


def _settings(args, device, model_name, gen) -> list[Setting]:
    import timm

    import effkern.timm as et

    arch_name, kw = MODELS[model_name]
    B, img, dtype = args.batch, args.img, args.dtype_t
    base = timm.create_model(arch_name, pretrained=False, img_size=img, **kw).to(device).train()
    patched = et.patch(copy.deepcopy(base))
    arch = _arch(base)
    p0 = base.patch_embed.proj.kernel_size[0]
    tag = f"{model_name} b{B}"
    x = _images(B, img, device, gen)
    step = lambda model, fn: _make_step(model, fn, device, dtype)  # noqa: E731
    base_fwd = fwd_flops(arch, img, p0)
    timm_one = Setting(f"{tag} p{p0}", "timm", base, step(base, lambda: base(x)), base_fwd)
    out = [timm_one]
    singles = [(p0, k) for k in args.keeps_list] + [(p, 1.0) for p in args.patches_list if p != p0]
    singles += [c for c in args.combos_list if c not in singles]
    for p, k in singles:
        size = img - img % p
        xs = x if size == img else _images(B, size, device, gen)
        same = _same_tokens_peer(arch_name, kw, base, p, k, size, xs, device, step)
        shape = f"{tag}{'' if size == img else f' {size}px'} p{p} keep{k:g}"
        if same is not None:
            same.shape = f"{shape} {same.shape}"
            out.append(same)
        out.append(Setting(shape, "effkern", patched,
                           step(patched, lambda xs=xs, p=p, k=k: patched(xs, patch_size=p, keep=k)),
                           fwd_flops(arch, size, p, k), peer=[timm_one], same_tokens=same,
                           extra={"tokens_per_image": max(1, int((size // p) ** 2 * k)) + arch["prefix"]}))
    if args.no_multiview:
        return out

    # MoCo: two views at img; timm once per view and as one 2B batch (the better is the peer)
    x2 = _images(B, img, device, gen)
    feats = lambda m, v: m.forward_head(m.forward_features(v), pre_logits=True)  # noqa: E731
    mv = f"{tag} moco 2x{img}"
    moco_peers = [Setting(f"{mv} per-view", "timm", base, step(base, lambda: [feats(base, v) for v in (x, x2)]),
                          2 * base_fwd, extra={"views": 2}),
                  Setting(f"{mv} one 2B batch", "timm", base, step(base, lambda: feats(base, torch.cat([x, x2]))),
                          2 * base_fwd, extra={"views": 2})]
    out += moco_peers
    for ka, kb in ((1.0, 1.0), (0.5, 0.25)):
        out.append(Setting(f"{mv} packed keep{ka:g}/{kb:g}", "effkern", patched,
                           step(patched, lambda ka=ka, kb=kb: patched.forward_views([x, x2], keeps=[ka, kb])),
                           fwd_flops(arch, img, p0, ka) + fwd_flops(arch, img, p0, kb), peer=moco_peers,
                           extra={"views": 2}))

    # DINO multi-crop: 2 global (img) + 8 local crops; timm = one call per resolution group
    local = max(p0, round(img * 96 / 224 / p0) * p0)
    g_views = [x, x2]
    l_views = [_images(B, local, device, gen) for _ in range(8)]
    dino_fwd = 8 * fwd_flops(arch, local, p0)
    dyn = timm.create_model(arch_name, pretrained=False, img_size=img, dynamic_img_size=True, **kw)
    dyn.load_state_dict(base.state_dict())
    dyn = dyn.to(device).train()
    g_cat, l_cat = torch.cat(g_views), torch.cat(l_views)
    dv = f"{tag} dino 2x{img}+8x{local}"
    dino_peer = Setting(f"{dv} per-res", "timm", dyn, step(dyn, lambda: [feats(dyn, v) for v in (g_cat, l_cat)]),
                        2 * base_fwd + dino_fwd, extra={"views": 10})
    out.append(dino_peer)
    for kg in (1.0, 0.5):
        out.append(Setting(f"{dv} packed global keep{kg:g}", "effkern", patched,
                           step(patched, lambda kg=kg: patched.forward_views(g_views + l_views,
                                                                             keeps=[kg, kg] + [None] * 8)),
                           2 * fwd_flops(arch, img, p0, kg) + dino_fwd, peer=[dino_peer], extra={"views": 10}))
    return out


def _rows(args, device, model_name, settings) -> list[Row]:
    from effkern.bench import _profile

    rows = []
    dtype = str(args.dtype_t).replace("torch.", "")
    for s in settings:
        if s.error is not None or not s.times:
            rows.append(Row("vit_train_step", s.shape, s.impl, dtype, float("nan"),
                            extra={"model": model_name, "error": s.error or "not timed"}))
            continue
        ms = statistics.median(s.times)
        extra = {"model": model_name, "ms_min": min(s.times), "ms_max": max(s.times),
                 "images_per_s": args.batch / (ms * 1e-3), **s.extra}
        ratios = {}
        peers = [p for p in (s.peer or []) if p.error is None and p.times]
        if peers:
            best = min(peers, key=lambda p: statistics.median(p.times))
            measured = statistics.median(best.times) / ms
            ratios["timm"] = measured
            extra["peer"] = best.shape
            extra["predicted_speedup"] = best.flops / s.flops
            extra["measured/predicted"] = measured / extra["predicted_speedup"]
        same = s.same_tokens
        if same is not None and same.error is None and same.times:
            ratios["timm same tokens"] = statistics.median(same.times) / ms
        try:
            extra["peak_mem_mib"], extra["peak_mem_kind"] = _profile.peak_memory_mib(
                s.step, device, params=list(s.model.parameters()))
            if args.breakdown:
                extra.update({f"t_{k}": v for k, v in _profile.breakdown(s.step).items() if f"t_{k}" in BREAKDOWN})
        except Exception as exc:  # noqa: BLE001
            extra["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        tflops = 3 * s.flops * args.batch / (ms * 1e-3) / 1e12 if s.flops else None
        rows.append(Row("vit_train_step", s.shape, s.impl, dtype, ms, tflops=tflops, ratios=ratios, extra=extra))
    return rows


def run(args) -> list[Row]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    _defaults(args, device)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    rows: list[Row] = []
    for name in args.models_list:
        settings = _settings(args, device, name, gen)
        time_interleaved(settings, device, args.repeat)
        rows += _rows(args, device, name, settings)
        report_partial(args, rows)
        del settings
        if device.type == "cuda":
            torch.cuda.empty_cache()
    assert all(math.isfinite(r.ms) or "error" in r.extra for r in rows)
    return rows
