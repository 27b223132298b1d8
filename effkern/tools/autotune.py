"""Autotune effkern's Triton kernels on this GPU at ViT shapes and report the winners.

    python -m effkern.tools.autotune [--out PREFIX]

Runs ``varlen_attention`` (forward + backward, bf16, packed qkv) for ViT-S/B/L/H heads
on token-dropped batches (keep 1 and 0.5 of 196 patches + CLS, 64 images) and
``patch_embed`` (forward + weight gradient, bf16, D 384/768/1024, keep 0.5); each first
call per tuning key autotunes over the architecture's list
(effkern/kernels/_autotune.py).  Prints and (``--out``) writes, per kernel and tuning
key, the chosen config and the seconds spent.  Needs a CUDA GPU (exit 2 without).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

ATTENTION = {"vit-s": (6, 64), "vit-b": (12, 64), "vit-l": (16, 64), "vit-h": (16, 80)}


def _attention(device, dtype, gen):
    import torch

    from effkern.ops import varlen_attention_qkvpacked

    for name, (heads, head_dim) in ATTENTION.items():
        for keep in (1.0, 0.5):
            kept = [197] * 64 if keep == 1 else (torch.randint(60, 138, (64,), generator=gen) + 1).tolist()
            cu = torch.tensor([0] + torch.tensor(kept).cumsum(0).tolist(), dtype=torch.int32, device=device)
            qkv = torch.randn(sum(kept), 3, heads, head_dim, device=device, dtype=dtype, requires_grad=True)
            out = varlen_attention_qkvpacked(qkv, cu, max(kept))
            out.sum().backward()
            yield f"attention {name} keep={keep:g}"


def _patch_embed(device, dtype, gen):
    import torch

    from effkern.kernels import patch_embed as kern

    images = torch.randn(64, 3, 224, 224, device=device, dtype=dtype)
    index = torch.randperm(64 * 196, generator=gen)[: 64 * 98].sort().values.to(device)
    for dim in (384, 768, 1024):
        weight = torch.randn(dim, 3 * 16 * 16, device=device, dtype=dtype)
        out = kern.patch_embed_fwd(images, weight, None, None, index, 16)
        kern.patch_embed_bwd_weight(torch.randn_like(out), images, index, 16)
        yield f"patch_embed D={dim} keep=0.5"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m effkern.tools.autotune", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="write PREFIX.json and PREFIX.md")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    import torch

    if not torch.cuda.is_available():
        print("effkern.tools.autotune: needs a CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    from effkern.kernels import patch_embed as pe
    from effkern.kernels import varlen_attention as va

    device, dtype = torch.device("cuda"), torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    timings = []
    for run in (_attention(device, dtype, gen), _patch_embed(device, dtype, gen)):
        started = time.perf_counter()
        for label in run:
            torch.cuda.synchronize()
            timings.append((label, round(time.perf_counter() - started, 2)))
            print(f"tuned {label}: {timings[-1][1]} s", flush=True)
            started = time.perf_counter()
    chosen = {k.fn.__name__: {str(key): cfg for key, cfg in k.best_configs().items()}
              for k in (va._fwd_kernel, va._bwd_dkdv_kernel, va._bwd_dq_kernel,
                        pe._patch_embed_fwd_kernel, pe._patch_embed_dw_kernel)}
    for kernel, picks in chosen.items():
        for key, cfg in picks.items():
            print(f"{kernel:28s} {key:50s} {cfg}")
    if args.out:
        meta = {"device": torch.cuda.get_device_name(), "capability": torch.cuda.get_device_capability(),
                "torch": torch.__version__, "triton": __import__("triton").__version__,
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                "command": "python -m effkern.tools.autotune " + " ".join(argv or sys.argv[1:])}
        with open(args.out + ".json", "w") as f:
            json.dump({"environment": meta, "seconds": timings, "chosen": chosen}, f, indent=1)
        with open(args.out + ".md", "w") as f:
            f.write(f"# Autotune winners on {meta['device']} ({meta['date']})\n\n`{meta['command']}`; "
                    f"torch {meta['torch']}, triton {meta['triton']}\n\n"
                    "| kernel | tuning key | config |\n|---|---|---|\n")
            for kernel, picks in chosen.items():
                for key, cfg in picks.items():
                    f.write(f"| {kernel} | `{key}` | {cfg} |\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
