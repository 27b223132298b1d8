"""``effkern bench attention``: ragged (packed) attention against the ways people
run attention on token-dropped / multi-crop ViT batches today.

Implementations, all on the same tokens:
  effkern  effkern.ops.varlen_attention(q, k, v, cu_seqlens, max_seqlen) under the
           backend --backend names (default triton: effkern's own kernel; ``auto``
           picks FlashAttention-2 for fp16/bf16 on CUDA, which is the varlen peer;
           on CPU the PyTorch reference path)
  sdpa     F.scaled_dot_product_attention on the zero-padded (B, H, Lmax, D) batch
           with a boolean key-padding mask.  The padded batch is built once, outside
           the timing: padding/unpadding costs are NOT charged to this peer.
  varlen   torch.nn.attention.varlen.varlen_attn (FlashAttention-2 varlen in
           PyTorch; CUDA, fp16/bf16 only) when importable.
  flex     FlexAttention (torch.compile'd) on (1, H, total, D) with a document mask;
           the BlockMask is built once, outside the timing (CUDA only).

Workloads (ViT heads: S 6x64, B 12x64, L 16x64, H 16x80):
  keep=r   batch of 197-token sequences (CLS + 196 patches) after token dropout:
           per-sample kept patches round(196 * r * u), u ~ U(0.75, 1.25) (u = 1
           for r = 1), clipped to [1, 196], + CLS -> ragged lengths.
  dino     DINO multi-crop packing: per image 2 x 197 (global) + 8 x 37 (local).
Modes: fwd, and fwd+bwd (grads of q, k, v).

TFLOP/s counts real tokens only: fwd 4 * sum(L_i^2) * H * D; fwd+bwd 3.5x that
(FlashAttention's convention: backward = 2.5x forward).  rel err: against an fp32
oracle (effkern's reference path in fp32; in float64 for fp32 runs), output for fwd,
max over dq/dk/dv for fwd+bwd.  Ratios: peer_ms / effkern_ms on the effkern row (> 1: effkern faster).
CUDA default: batch 256, bf16, all models/keeps/workloads.  CPU default (reduced,
well under a minute): batch 8, fp32, vit-s and vit-b, keep {1, 0.5}, dino; sdpa only.
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

from effkern.bench.common import Row, comma_list, int_at_least, keep_ratio, rel_err, report_partial, time_fn

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MODELS = {"vit-s": (6, 64), "vit-b": (12, 64), "vit-l": (16, 64), "vit-h": (16, 80)}
PEERS = ("sdpa", "varlen", "flex")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=int_at_least(1), default=None, help="images per batch (CUDA 256, CPU 8)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="CUDA bf16, CPU fp32")
    parser.add_argument("--models", type=comma_list(str, f"one of {', '.join(MODELS)}", MODELS.__contains__),
                        default=None, help="comma list of vit-s,vit-b,vit-l,vit-h "
                        "(CUDA all; CPU vit-s,vit-b)")
    parser.add_argument("--keeps", type=comma_list(float, "a keep ratio in (0, 1]", keep_ratio), default=None,
                        help="comma list of keep ratios (CUDA 1,0.75,0.5,0.25; CPU 1,0.5)")
    parser.add_argument("--no-dino", action="store_true", help="skip the DINO multi-crop workload")
    parser.add_argument("--modes", type=comma_list(str, "fwd or fwdbwd", ("fwd", "fwdbwd").__contains__),
                        default="fwd,fwdbwd", help="fwd and/or fwdbwd")
    parser.add_argument("--peers", type=comma_list(str, f"one of {', '.join(PEERS)}", PEERS.__contains__),
                        default=None, help="comma list of sdpa,varlen,flex (CUDA all; CPU sdpa)")
    parser.add_argument("--no-peers", action="store_true", help="time effkern only")
    parser.add_argument("--backend", choices=("triton", "auto", "flash", "reference"), default="triton",
                        help="effkern backend measured as 'effkern' (default triton: effkern's own kernel)")
    parser.add_argument("--seed", type=int, default=0)


# ---------------------------------------------------------------- workloads

def dropout_lengths(batch: int, keep: float, gen: torch.Generator) -> list[int]:
    if keep >= 1.0:
        return [197] * batch
    u = torch.empty(batch).uniform_(0.75, 1.25, generator=gen)
    kept = (196 * keep * u).round().clamp(1, 196).to(torch.int64)
    return (kept + 1).tolist()


def dino_lengths(batch: int) -> list[int]:
    return ([197] * 2 + [37] * 8) * batch


def _workloads(args, batch, gen):
    out = [(f"keep={k:g}", dropout_lengths(batch, k, gen)) for k in args.keeps_list]
    if not args.no_dino:
        out.append(("dino 2x197+8x37", dino_lengths(batch)))
    return out


# ---------------------------------------------------------------- implementations

def _pad_batch(x, lengths, lmax):
    """(total, H, D) -> (B, H, Lmax, D) zero-padded."""
    rows = []
    start = 0
    for n in lengths:
        rows.append(F.pad(x[start:start + n], (0, 0, 0, 0, 0, lmax - n)))
        start += n
    return torch.stack(rows).transpose(1, 2).contiguous()


def _unpad(y, lengths):
    """(B, H, Lmax, D) -> (total, H, D)."""
    return torch.cat([y[i, :, :n].transpose(0, 1) for i, n in enumerate(lengths)])


def _impls(q, k, v, cu, lengths, peers, device):
    """name -> (fn(q, k, v) -> out packed (total, H, D), inputs (q, k, v))."""
    import effkern

    lmax = max(lengths)
    impls = {"effkern": (lambda a, b, c: effkern.ops.varlen_attention(a, b, c, cu, lmax), (q, k, v))}
    if "sdpa" in peers:
        qp, kp, vp = (_pad_batch(t.detach(), lengths, lmax).requires_grad_() for t in (q, k, v))
        ar = torch.arange(lmax, device=device)
        mask = (ar[None, :] < torch.tensor(lengths, device=device)[:, None])[:, None, None, :]
        impls["sdpa"] = (lambda a, b, c: F.scaled_dot_product_attention(a, b, c, attn_mask=mask),
                         (qp, kp, vp))
    if "varlen" in peers:
        try:
            from torch.nn.attention.varlen import varlen_attn

            impls["varlen"] = (lambda a, b, c: varlen_attn(a, b, c, cu, cu, lmax, lmax), (q, k, v))
        except ImportError:
            pass
    if "flex" in peers:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        total = q.shape[0]
        doc = torch.repeat_interleave(torch.arange(len(lengths), device=device),
                                      torch.tensor(lengths, device=device))

        def document(b, h, q_idx, kv_idx):
            return doc[q_idx] == doc[kv_idx]

        block_mask = create_block_mask(document, None, None, total, total, device=device)
        flex = torch.compile(flex_attention)
        qf, kf, vf = (t.detach().transpose(0, 1).unsqueeze(0).requires_grad_() for t in (q, k, v))
        impls["flex"] = (lambda a, b, c: flex(a, b, c, block_mask=block_mask), (qf, kf, vf))
    return impls


def _to_packed(name, out, grads, lengths):
    """An implementation's output/grads in the packed (total, H, D) layout."""
    if name == "sdpa":
        return _unpad(out, lengths), [_unpad(g, lengths) for g in grads]
    if name == "flex":
        return out[0].transpose(0, 1), [g[0].transpose(0, 1) for g in grads]
    return out, grads


def _oracle(q, k, v, cu, lengths):
    """fp32 oracle (float64 when the inputs are fp32, so the error is not 0 by construction)."""
    from effkern.reference import varlen_attention as ref

    odt = torch.float64 if q.dtype == torch.float32 else torch.float32
    qf, kf, vf = (t.detach().to(odt).requires_grad_() for t in (q, k, v))
    with torch.no_grad():
        out, lse = ref.forward(qf, kf, vf, cu, max(lengths), q.shape[-1] ** -0.5)
    return out, lse, (qf, kf, vf)


# ---------------------------------------------------------------- run

def _defaults(args, device):
    gpu = device.type == "cuda"
    args.batch = args.batch or (256 if gpu else 8)
    args.dtype_t = DTYPES[args.dtype or ("bf16" if gpu else "fp32")]
    args.models_list = (args.models or ("vit-s,vit-b,vit-l,vit-h" if gpu else "vit-s,vit-b")).split(",")
    args.keeps_list = [float(x) for x in (args.keeps or ("1,0.75,0.5,0.25" if gpu else "1,0.5")).split(",")]
    args.modes_list = [m.strip() for m in args.modes.split(",") if m.strip()]
    peers = [] if args.no_peers else (args.peers or ("sdpa,varlen,flex" if gpu else "sdpa")).split(",")
    if not gpu:
        peers = [p for p in peers if p == "sdpa"]  # varlen_attn and flex need CUDA here
    if args.dtype_t == torch.float32:
        peers = [p for p in peers if p != "varlen"]  # FlashAttention: fp16/bf16 only
    args.peers_list = peers


def _measure(name, fn, inputs, mode, device, repeat, grad_out):
    if mode == "fwd":
        with torch.no_grad():
            ms = time_fn(lambda: fn(*inputs), device, repeat=repeat)
            return ms, fn(*inputs), None
    def step():
        out = fn(*inputs)
        return out, torch.autograd.grad(out, inputs, grad_out)
    ms = time_fn(step, device, repeat=repeat)
    out, grads = step()
    return ms, out, grads


def _shape_rows(args, device, model, label, lengths, gen) -> list[Row]:
    heads, head_dim = MODELS[model]
    dtype = args.dtype_t
    total = sum(lengths)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)
    q, k, v = (torch.randn(total, heads, head_dim, generator=gen).to(device, dtype).requires_grad_()
               for _ in range(3))
    flops_fwd = 4 * sum(n * n for n in lengths) * heads * head_dim
    ref_out, _, ref_in = _oracle(q, k, v, cu, lengths)
    impls = _impls(q, k, v, cu, lengths, args.peers_list, device)
    rows = []
    for mode in args.modes_list:
        g = torch.randn(total, heads, head_dim, generator=gen).to(device, dtype)
        ref_grads = None
        if mode != "fwd":
            from effkern.reference import varlen_attention as ref

            _, lse = ref.forward(*ref_in, cu, max(lengths), head_dim ** -0.5)
            ref_grads = ref.backward(g.to(ref_in[0].dtype), *ref_in, ref_out, lse, cu, max(lengths), head_dim ** -0.5)
        flops = flops_fwd * (1.0 if mode == "fwd" else 3.5)
        results = {}
        for name, (fn, inputs) in impls.items():
            grad_out = g if name == "effkern" or name == "varlen" else _repack_grad(name, g, lengths, inputs[0])
            try:
                ms, out, grads = _measure(name, fn, inputs, mode, device, args.repeat, grad_out)
            except Exception as exc:  # a peer that cannot run this shape/dtype here
                results[name] = None
                rows.append(Row("varlen_attention", "", name, str(dtype).replace("torch.", ""), float("nan"),
                                extra={"error": f"{type(exc).__name__}: {str(exc)[:200]}"}))
                continue
            out, grads = _to_packed(name, out, grads or [], lengths)
            err = rel_err(out, ref_out) if mode == "fwd" else max(rel_err(a, b) for a, b in zip(grads, ref_grads))
            results[name] = ms
            rows.append(Row("varlen_attention", "", name, str(dtype).replace("torch.", ""), ms,
                            tflops=flops / (ms * 1e-3) / 1e12, rel_err=err,
                            extra={"mode": mode, "tokens": total, "sequences": len(lengths),
                                   "max_seqlen": max(lengths),
                                   **({"backend": getattr(args, "backend", "triton")} if name == "effkern" else {})}))
        shape = f"{model} {label} {'fwd' if mode == 'fwd' else 'fwd+bwd'} T={total}"
        mode_rows = rows[-len(impls):]
        for row in mode_rows:
            row.shape = shape
        ours = results.get("effkern")
        if ours:
            mode_rows[0].ratios = {p: results[p] / ours for p in impls if p != "effkern" and results.get(p)}
    return rows


def _repack_grad(name, g, lengths, like):
    if name == "sdpa":
        return _pad_batch(g, lengths, max(lengths))
    if name == "flex":
        return g.transpose(0, 1).unsqueeze(0).contiguous()
    return g


def run(args) -> list[Row]:
    import effkern

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    _defaults(args, device)
    gen = torch.Generator().manual_seed(args.seed)
    rows: list[Row] = []
    for model in args.models_list:
        if model not in MODELS:
            raise ValueError(f"unknown model {model!r}; one of {', '.join(MODELS)}")
        for label, lengths in _workloads(args, args.batch, gen):
            with effkern.use_backend(getattr(args, "backend", "triton")):
                rows += _shape_rows(args, device, model, label, lengths, gen)
            report_partial(args, rows)
    assert all(math.isfinite(r.ms) or "error" in r.extra for r in rows)
    return rows
