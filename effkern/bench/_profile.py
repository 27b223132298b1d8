"""Where a training step's time and memory go: the breakdown and peak-memory columns of
``effkern bench vit`` / ``effkern bench step``.

Breakdown: one profiled call of the step (``torch.profiler``, CPU activity; on CUDA the
device kernels are not attributed, so the breakdown is reported on CPU only).  Every
operator's *self* time goes to one category, chosen by the nearest enclosing event that
names one -- an effkern op (``effkern::patch_embed_*`` -> embed, ``effkern::varlen_*`` ->
attention), ATen's fused attention, an autograd node (``evaluate_function:
AddmmBackward0`` -> matmul), the optimizer's ``Optimizer.step`` -- else by the operator's
own name.  So the GEMM inside the patch-embedding op counts as embed and the matmuls of
a Linear's backward as matmul.  Categories:

  embed      patch embedding (effkern op or timm's conv), weight / position resampling
  attention  softmax attention, forward and backward, any backend
  matmul     the Linear layers: qkv, proj, MLP, heads (addmm / mm and their backward)
  norm_act   LayerNorm, GELU and other elementwise math
  gather     index / index_select / index_put / cat / copies: packing, unpacking, gathers
  optimizer  everything under Optimizer.step
  other      the rest (allocation, Python-side ops, losses)

Peak memory: CUDA ``max_memory_allocated`` of one step; on CPU (no allocator statistics)
the bytes of the distinct storages autograd saves for the backward during the step
(``torch.autograd.graph.saved_tensors_hooks``) -- the activation memory that dominates a
training step's peak, not a process RSS.
"""

from __future__ import annotations

from typing import Callable

import torch

CATEGORIES = ("embed", "attention", "matmul", "norm_act", "gather", "optimizer", "other")

# (substring, category), first match wins; checked on enclosing events, nearest first
_SCOPES = (
    ("Optimizer.step", "optimizer"),
    ("patch_embed", "embed"), ("PatchEmbed", "embed"), ("resize_pos_embed", "embed"),
    ("ConvolutionBackward", "embed"), ("UpsampleBicubic2DAa", "embed"),
    ("varlen_attention", "attention"), ("scaled_dot_product", "attention"), ("ScaledDotProduct", "attention"),
    ("AddmmBackward", "matmul"), ("MmBackward", "matmul"), ("BmmBackward", "matmul"),
    ("LinearBackward", "matmul"),
    ("NativeLayerNormBackward", "norm_act"), ("GeluBackward", "norm_act"),
    ("IndexBackward", "gather"), ("IndexSelectBackward", "gather"), ("CatBackward", "gather"),
)
# own-name rules for operators outside any of the scopes above
_OPS = (
    ("convolution", "embed"), ("upsample", "embed"),
    ("addmm", "matmul"), ("aten::mm", "matmul"), ("bmm", "matmul"), ("aten::linear", "matmul"),
    ("aten::matmul", "matmul"),
    ("layer_norm", "norm_act"), ("gelu", "norm_act"), ("aten::mul", "norm_act"), ("aten::add", "norm_act"),
    ("aten::div", "norm_act"), ("aten::sigmoid", "norm_act"), ("aten::exp", "norm_act"),
    ("index", "gather"), ("aten::cat", "gather"), ("aten::copy_", "gather"), ("gather", "gather"),
    ("scatter", "gather"), ("repeat_interleave", "gather"), ("aten::stack", "gather"),
    ("searchsorted", "gather"), ("aten::clone", "gather"), ("contiguous", "gather"),
)


def _match(name: str, rules) -> str | None:
    for key, cat in rules:
        if key in name:
            return cat
    return None


def _category(event) -> str:
    node = event
    while node is not None:
        cat = _match(node.name, _SCOPES)
        if cat is not None:
            return cat
        node = node.cpu_parent
    return _match(event.name, _OPS) or "other"


def breakdown(step: Callable[[], object]) -> dict[str, float]:
    """Milliseconds of one ``step()`` per category (self CPU time; see the module doc)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    out = dict.fromkeys(CATEGORIES, 0.0)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CPU:
            out[_category(event)] += event.self_cpu_time_total / 1e3
    return out


def peak_memory_mib(step: Callable[[], object], device: torch.device, params=()) -> tuple[float, str]:
    """(MiB, what was measured) of one ``step()``: CUDA peak allocated, else saved
    activations (storages of ``params``, the weights the step saves, left out)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_peak_allocated"
    weights = {p.untyped_storage().data_ptr() for p in params}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        s = t.untyped_storage()
        if s.data_ptr() not in weights:
            storages[s.data_ptr()] = max(storages.get(s.data_ptr(), 0), s.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(storages.values()) / 2**20, "saved_activations"
