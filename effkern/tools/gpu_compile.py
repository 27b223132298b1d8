"""Compile every Triton kernel of effkern for Hopper and Ampere -- no GPU needed.

What
----
Triton's compiler runs on the CPU: ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", 90, 32))`` lowers a kernel to TTGIR, PTX and (through
ptxas) a cubin.  This module does that for every kernel x autotune config x
architecture that a real launch would try, and reads back:

  registers, spills   from ptxas' ``-v`` log (Triton's TRITON_DUMP_PTXAS_LOG knob);
  shared memory       ``metadata.shared`` (bytes per program);
  tensor-core use     how each ``tt.dot`` was lowered, from the TTGIR:
                      ``wgmma`` (Hopper warp-group MMA), ``mma.sync`` (Ampere MMA,
                      also legal on Hopper) or ``fma`` (CUDA cores);
                      the PTX's wgmma.mma_async / mma.sync counts are kept beside it.

A config FAILS when it does not compile, spills (any spill store/load bytes),
needs more shared memory than the architecture allows per block (sm_90 227 KiB,
sm_80 163 KiB), needs more registers than an SM has for one block, runs a
16-bit (fp16/bf16) dot on CUDA cores, or -- on sm_90 -- runs a 16-bit dot on
mma.sync instead of wgmma (the per-architecture config lists promise wgmma
tiles there).  fp32 dots with input_precision="ieee" are FMA by design.

How launches are specialised
----------------------------
The real launchers (effkern.kernels.*) are called on ``meta`` tensors shaped
like a ViT training step, with every kernel object swapped for a recorder.  The
recorded arguments go through Triton's own JIT binder for the target
architecture, so dtypes, pointer alignment (16-byte divisibility of data
pointers and strides, including the in-place q/k/v views of a packed qkv),
integer specialisation and constexprs are exactly those of the launch.  The
autotune configs are the ones the kernel's autotuner would try for that launch
and architecture (``effkern.kernels._autotune.configs_for``).

Kernels are discovered, not listed: every ``triton.autotune``'d object and every
``@triton.jit`` function named ``*_kernel`` in the kernel modules; a kernel that
no workload launches is reported as an error.

Usage: ``effkern doctor --compile-gpu [--scope ci|full] [--out PREFIX]``
(``python -m effkern.tools.gpu_compile`` takes the same arguments).  ``ci``
compiles one representative launch per kernel with the first config of each
architecture's list (seconds per kernel); ``full`` every config of every
workload (minutes).  Exit status 1 when any config fails.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib
import io
import json
import os
import platform
import re
import sys
import time
from typing import Callable, Iterable

ARCHS = {
    90: {"name": "sm_90", "shared_limit": 232448, "regs_per_sm": 65536},  # H100/H200: 227 KiB opt-in
    80: {"name": "sm_80", "shared_limit": 166912, "regs_per_sm": 65536},  # A100: 163 KiB opt-in
}
KERNEL_MODULES = ("effkern.kernels.varlen_attention", "effkern.kernels.patch_embed")
SIXTEEN_BIT = ("f16", "bf16")


# ----------------------------------------------------------------------------- records

@dataclasses.dataclass
class Launch:
    """One recorded kernel launch: the kernel object and its arguments."""
    kernel: str                 # module-qualified kernel name, e.g. varlen_attention._fwd_kernel
    obj: object                 # the Autotuner or JITFunction
    args: tuple
    kwargs: dict
    workload: str = ""


@dataclasses.dataclass
class Result:
    kernel: str
    arch: int
    workload: str
    config: str
    ok: bool = False
    error: str = ""
    registers: int | None = None
    spill_bytes: int | None = None      # spill stores + spill loads
    stack_bytes: int | None = None
    shared_bytes: int | None = None
    num_warps: int = 4
    dots: dict = dataclasses.field(default_factory=dict)       # lowering -> count of 16-bit/fp32 dots
    dot_detail: list = dataclasses.field(default_factory=list)  # [(operand dtype, lowering, MxNxK)]
    ptx: dict = dataclasses.field(default_factory=dict)        # instruction counts in the PTX
    compile_s: float = 0.0
    problems: list = dataclasses.field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.ok and not self.problems


# ----------------------------------------------------------------------------- discovery

def _triton():
    import triton
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    try:  # effkern's per-architecture autotune wrapper (absent in older checkouts)
        from effkern.kernels._autotune import Tuned
    except ImportError:  # pragma: no cover
        Tuned = Autotuner
    return triton, (Autotuner, Tuned), JITFunction


def discover() -> dict[str, tuple[object, str, object]]:
    """{qualified name: (module, attribute, kernel object)} of every Triton kernel."""
    _, tuned_types, JITFunction = _triton()
    found = {}
    for modname in KERNEL_MODULES:
        module = importlib.import_module(modname)
        tuned_fns = {id(obj.fn) for obj in vars(module).values() if isinstance(obj, tuned_types)}
        for attr, obj in vars(module).items():
            is_kernel = isinstance(obj, tuned_types) or (
                isinstance(obj, JITFunction) and attr.endswith("_kernel") and id(obj) not in tuned_fns)
            if is_kernel:
                found[f"{modname.rsplit('.', 1)[1]}.{attr}"] = (module, attr, obj)
    return found


class _Recorder:
    """Stands in for a kernel object: ``kernel[grid](*args, **kwargs)`` records the call."""

    def __init__(self, name, obj, sink):
        self.name, self.obj, self.sink = name, obj, sink
        self.fn = getattr(obj, "fn", obj)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.sink.append(Launch(self.name, self.obj, args, kwargs))
        return launch


@contextlib.contextmanager
def recording(kernels: dict):
    """Swap every kernel for a recorder; yields the list that fills with Launch records."""
    sink: list[Launch] = []
    saved = []
    for name, (module, attr, obj) in kernels.items():
        saved.append((module, attr, obj))
        setattr(module, attr, _Recorder(name, obj, sink))
    try:
        yield sink
    finally:
        for module, attr, obj in saved:
            setattr(module, attr, obj)


# ----------------------------------------------------------------------------- workloads

# ViT-B/16 at keep ~0.5: 16 images' ragged lengths (CLS + kept patches), max 197.
VIT_LENGTHS = [99, 113, 87, 197, 105, 92, 120, 76, 101, 197, 88, 110, 95, 131, 84, 99]
DTYPE_NAMES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32",
               "tf32": "float32"}  # tf32: fp32 patch embedding with allow_tf32 (attention has no tf32 path)


def attention_workload(dtype: str, head_dim: int, heads: int = 12, lengths=VIT_LENGTHS):
    """Forward + backward of the packed-qkv (timm) path: q/k/v and dq/dk/dv are views."""
    import torch

    from effkern.kernels import varlen_attention as kern

    dt = getattr(torch, DTYPE_NAMES[dtype])
    total = sum(lengths)
    meta = dict(device="meta", dtype=dt)
    qkv = torch.empty(total, 3, heads, head_dim, **meta)
    q, k, v = qkv.unbind(1)
    out = torch.empty(total, heads, head_dim, **meta)
    lse = torch.empty(heads, total, device="meta", dtype=torch.float32)
    cu = torch.empty(len(lengths) + 1, device="meta", dtype=torch.int32)
    scale = head_dim ** -0.5
    kern.forward(q, k, v, cu, max(lengths), scale, out, lse)
    dqkv = torch.empty_like(qkv)
    dq, dk, dv = dqkv.unbind(1)
    kern.backward(torch.empty_like(out), q, k, v, out, lse, cu, max(lengths), scale, dq, dk, dv)
    return f"{dtype} d{head_dim}"


def patch_embed_workload(dtype: str, dim: int, keep: bool = True, batch: int = 64, patch: int = 16):
    """Forward and weight gradient at 224x224, patch 16, with (keep) or without token dropout."""
    import torch

    from effkern.kernels import patch_embed as kern

    dt = getattr(torch, DTYPE_NAMES[dtype])
    if dtype == "tf32":  # the launcher picks tf32 on CUDA when torch allows it; meta tensors are not CUDA
        precision, kern._precision = kern._precision, lambda *_: "tf32"
        try:
            return patch_embed_workload("fp32", dim, keep, batch, patch).replace("fp32", "tf32")
        finally:
            kern._precision = precision
    n = (224 // patch) ** 2
    tokens = batch * n // 2 + 7 if keep else batch * n
    images = torch.empty(batch, 3, 224, 224, device="meta", dtype=dt)
    weight = torch.empty(dim, 3 * patch * patch, device="meta", dtype=dt)
    bias = torch.empty(dim, device="meta", dtype=dt)
    pos = torch.empty(n, dim, device="meta", dtype=dt)
    index = torch.empty(tokens, device="meta", dtype=torch.int64) if keep else None
    kern.patch_embed_fwd(images, weight, bias, pos, index, patch)
    kern.patch_embed_bwd_weight(torch.empty(tokens, dim, device="meta", dtype=dt), images, index, patch)
    return f"{dtype} D{dim}{' keep' if keep else ''}"


def workloads(scope: str, dtypes=None, head_dims=None, dims=None) -> list[Callable[[], str]]:
    """The launches to compile.  ci: one representative per kernel (bf16, ViT-B)."""
    if scope == "ci":
        return [lambda: attention_workload("bf16", 64), lambda: patch_embed_workload("bf16", 768)]
    dtypes = dtypes or ("fp16", "bf16", "fp32")
    head_dims = head_dims or (64, 80, 128)
    dims = dims or (384, 768)
    out = [lambda d=d, h=h: attention_workload(d, h) for d in dtypes for h in head_dims if d != "tf32"]
    out += [lambda d=d, D=D: patch_embed_workload(d, D) for d in dtypes for D in dims]
    return out


def record_launches(kernels: dict, scope: str, **kw) -> list[Launch]:
    launches: list[Launch] = []
    for make in workloads(scope, **kw):
        with recording(kernels) as sink:
            label = make()
        for launch in sink:
            launch.workload = label
        launches += sink
    return launches


# ----------------------------------------------------------------------------- compile one

def configs_for(launch: Launch, arch: int) -> list:
    """The autotune configs a launch tries on ``arch`` (a plain kernel: its launch options)."""
    _, tuned_types, _ = _triton()
    if not isinstance(launch.obj, tuned_types):
        return [None]
    if not hasattr(launch.obj, "candidates"):  # a bare triton.autotune: one list for every architecture
        return list(launch.obj.configs)
    named = {**dict(zip(launch.obj.arg_names, launch.args)), **launch.kwargs}
    return launch.obj.candidates(arch, named)


def _config_str(config, kwargs) -> str:
    if config is None:
        return "launch: " + ", ".join(f"{k}={v}" for k, v in kwargs.items() if k.isupper() and k.startswith("BLOCK"))
    blocks = " ".join(f"{k[6:] if k.startswith('BLOCK_') else k}{v}" for k, v in config.kwargs.items())
    return f"{blocks} w{config.num_warps} s{config.num_stages}"


_DOT = re.compile(r"=\s*(tt\.dot|ttng\.warp_group_dot)\b(.*)$")
_ENC = re.compile(r"^(#[\w]+)\s*=\s*(.*)$")


def dot_lowering(ttgir: str) -> list[tuple[str, str, str]]:
    """[(operand dtype, lowering, MxNxK)] for every dot in a TTGIR module."""
    aliases = {m.group(1): m.group(2) for m in map(_ENC.match, ttgir.splitlines()) if m}
    found = []
    for line in ttgir.splitlines():
        m = _DOT.search(line)
        if not m:
            continue
        op, rest = m.groups()
        types = re.findall(r"(?:tensor|!ttg\.memdesc)<([0-9x]+)x(\w+)(?:,\s*(#[\w]+))?", rest.split(":", 1)[-1])
        if len(types) < 3:
            continue
        (a_shape, a_dt, _), _, (c_shape, _, c_enc) = types[0], types[1], types[-1]
        m_dim, k_dim = a_shape.split("x")[-2:]
        n_dim = c_shape.split("x")[-1]
        if op == "ttng.warp_group_dot":
            kind = "wgmma"
        else:
            enc = aliases.get(c_enc or "", "")
            if "nvidia_mma" in enc:
                major = re.search(r"versionMajor\s*=\s*(\d+)", enc)
                kind = "wgmma" if major and major.group(1) == "3" else "mma.sync"
            else:
                kind = "fma"
        found.append((a_dt, kind, f"{m_dim}x{n_dim}x{k_dim}"))
    return found


_REGS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def compile_one(launch: Launch, config, arch: int) -> Result:
    """Compile one launch with one config for ``arch`` and check it."""
    triton, _, _ = _triton()
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    result = Result(launch.kernel, arch, launch.workload, _config_str(config, launch.kwargs))
    jit = launch.obj
    while not hasattr(jit, "params"):  # Autotuner / Heuristics -> the JITFunction
        jit = jit.fn
    kwargs = dict(launch.kwargs)
    if config is not None:
        kwargs.update(config.all_kwargs())
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    started = time.perf_counter()
    log = io.StringIO()
    try:
        binder = create_function_from_signature(jit.signature, jit.params, backend)
        bound, specialization, options = binder(*launch.args, **kwargs)
        options, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound, specialization, options)
        result.num_warps = options.num_warps
        with knobs.nvidia.scope(), knobs.compilation.scope(), contextlib.redirect_stdout(log):
            knobs.nvidia.dump_ptxas_log = True
            knobs.compilation.always_compile = True  # the ptxas log is only printed on a real compile
            compiled = triton.compile(ASTSource(jit, signature, constexprs, attrs), target=target,
                                      options=options.__dict__)
    except Exception as exc:  # noqa: BLE001 - any compiler error is a result, not a crash
        result.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"
        result.problems.append("compile error")
        result.compile_s = time.perf_counter() - started
        return result
    result.compile_s = time.perf_counter() - started
    result.ok = True
    text = log.getvalue()
    regs, spill = _REGS.search(text), _SPILL.search(text)
    result.registers = int(regs.group(1)) if regs else None
    if spill:
        result.stack_bytes = int(spill.group(1))
        result.spill_bytes = int(spill.group(2)) + int(spill.group(3))
    result.shared_bytes = int(compiled.metadata.shared)
    result.dot_detail = dot_lowering(compiled.asm["ttgir"])
    for _, kind, _ in result.dot_detail:
        result.dots[kind] = result.dots.get(kind, 0) + 1
    ptx = compiled.asm["ptx"]
    result.ptx = {"wgmma.mma_async": ptx.count("wgmma.mma_async"), "mma.sync": ptx.count("mma.sync")}
    _judge(result)
    return result


def _judge(r: Result) -> None:
    limits = ARCHS[r.arch]
    if r.registers is None or r.spill_bytes is None:
        r.problems.append("no ptxas -v log (registers/spills unknown)")
    elif r.spill_bytes > 0:
        r.problems.append(f"spills {r.spill_bytes} B")
    if r.registers and r.registers * r.num_warps * 32 > limits["regs_per_sm"]:
        r.problems.append(f"{r.registers} regs x {r.num_warps * 32} threads > {limits['regs_per_sm']}")
    if r.shared_bytes is not None and r.shared_bytes > limits["shared_limit"]:
        r.problems.append(f"shared {r.shared_bytes} B > {limits['shared_limit']} B")
    for dtype, kind, shape in r.dot_detail:
        if dtype in SIXTEEN_BIT and kind == "fma":
            r.problems.append(f"{dtype} dot {shape} on FMA")
        elif dtype in SIXTEEN_BIT and r.arch >= 90 and kind != "wgmma":
            r.problems.append(f"{dtype} dot {shape} on {kind}, not wgmma")
    r.problems[:] = list(dict.fromkeys(r.problems))  # one line per distinct problem


# ----------------------------------------------------------------------------- sweep

def sweep(scope: str = "ci", archs: Iterable[int] = (90, 80), kernels: Iterable[str] | None = None,
          progress: Callable[[str], None] | None = None, on_result: Callable[[list], None] | None = None,
          **workload_kw) -> list[Result]:
    """Compile the launches of ``scope`` for ``archs``; ``on_result(results so far)`` after each."""
    found = discover()
    launches = record_launches(found, scope, **workload_kw)
    results: list[Result] = []
    for name in found:
        if not any(launch.kernel == name for launch in launches):
            for arch in archs:
                results.append(Result(name, arch, "-", "-", error="no workload launches this kernel",
                                      problems=["not launched"]))
    if kernels:
        wanted = set(kernels)
        launches = [launch for launch in launches if launch.kernel in wanted or launch.kernel.split(".")[-1] in wanted]
    jobs = [(launch, config, arch) for arch in archs for launch in launches
            for config in (configs_for(launch, arch)[:1] if scope == "ci" else configs_for(launch, arch))]
    for i, (launch, config, arch) in enumerate(jobs, 1):
        r = compile_one(launch, config, arch)
        results.append(r)
        if on_result:
            on_result(results)
        if progress:
            state = "ok" if r.passed else "FAIL " + "; ".join(r.problems)
            progress(f"[{i}/{len(jobs)}] sm_{arch} {r.kernel} {r.workload} {r.config}: "
                     f"regs {r.registers} spill {r.spill_bytes} smem {r.shared_bytes} "
                     f"dots {r.dots} ({r.compile_s:.1f}s) {state}")
    return results


def summarize(results: list[Result]) -> list[dict]:
    """Per (kernel, arch): configs, passed, max registers, spilling configs, max shared, lowering."""
    groups: dict[tuple, list[Result]] = {}
    for r in results:
        groups.setdefault((r.kernel, r.arch), []).append(r)
    rows = []
    for (kernel, arch), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
        ok = [r for r in rs if r.ok]
        lowering: dict[str, int] = {}
        for r in ok:
            kinds = sorted(set(f"{dtype} {kind}" for dtype, kind, _ in r.dot_detail)) or ["no dot"]
            key = "+".join(kinds)
            lowering[key] = lowering.get(key, 0) + 1
        rows.append({
            "kernel": kernel, "arch": f"sm_{arch}", "compiles": len(rs),
            "errors": sum(not r.ok for r in rs), "failed": sum(not r.passed for r in rs),
            "max_registers": max((r.registers or 0) for r in ok) if ok else None,
            "spilling": sum(bool(r.spill_bytes) for r in ok),
            "max_spill_bytes": max((r.spill_bytes or 0) for r in ok) if ok else None,
            "max_shared_kib": round(max((r.shared_bytes or 0) for r in ok) / 1024, 1) if ok else None,
            "lowering": lowering,
        })
    return rows


def environment() -> dict:
    import torch
    import triton

    ptxas = None
    with contextlib.suppress(Exception):
        from triton import knobs
        ptxas = knobs.nvidia.ptxas.version
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "triton": triton.__version__, "torch": torch.__version__, "ptxas": ptxas,
            "python": platform.python_version(), "host": platform.machine()}


def to_markdown(results: list[Result], env: dict, command: str) -> str:
    lines = [f"# Triton GPU compile check (no GPU): `{command}`", "",
             f"{env['date']}; triton {env['triton']}, torch {env['torch']}, ptxas {env['ptxas']}.", "",
             "## Per kernel and architecture", "",
             "| kernel | arch | compiles | failed | max regs | spilling (max B) | max smem KiB "
             "| dot operand type and lowering (configs) |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for s in summarize(results):
        low = ", ".join(f"{k}: {v}" for k, v in sorted(s["lowering"].items()))
        lines.append(f"| {s['kernel']} | {s['arch']} | {s['compiles']} | {s['failed']} | {s['max_registers']} | "
                     f"{s['spilling']} ({s['max_spill_bytes']}) | {s['max_shared_kib']} | {low} |")
    lines += ["", "## Every config", "",
              "| kernel | arch | workload | config | regs | spill B | smem KiB | dots | result |",
              "|---|---|---|---|---:|---:|---:|---|---|"]
    for r in results:
        dots = ", ".join(f"{k} {v}" for k, v in sorted(r.dots.items()))
        smem = "" if r.shared_bytes is None else f"{r.shared_bytes / 1024:.1f}"
        verdict = "ok" if r.passed else "; ".join(r.problems) + (f" ({r.error})" if r.error else "")
        lines.append(f"| {r.kernel} | sm_{r.arch} | {r.workload} | {r.config} | {r.registers} | "
                     f"{r.spill_bytes} | {smem} | {dots} | {verdict} |")
    return "\n".join(lines) + "\n"


def write(prefix: str, results: list[Result], command: str) -> None:
    env = environment()
    os.makedirs(os.path.dirname(prefix) or ".", exist_ok=True)
    payload = {"command": command, "environment": env, "summary": summarize(results),
               "results": [dataclasses.asdict(r) | {"passed": r.passed} for r in results]}
    with open(prefix + ".json", "w") as f:
        json.dump(payload, f, indent=1)
    with open(prefix + ".md", "w") as f:
        f.write(to_markdown(results, env, command))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scope", choices=("ci", "full"), default="ci",
                        help="ci: one representative config per kernel per arch; full: every config and workload")
    parser.add_argument("--arch", default="90,80", help="comma list of compute capabilities (default 90,80)")
    parser.add_argument("--kernels", default=None, help="comma list of kernel names to compile (default all)")
    parser.add_argument("--dtypes", default=None, help="full scope: comma list of fp16,bf16,fp32")
    parser.add_argument("--head-dims", default=None, help="full scope: comma list of attention head dims")
    parser.add_argument("--dims", default=None, help="full scope: comma list of patch-embed widths D")
    parser.add_argument("--out", default=None, help="write PREFIX.json and PREFIX.md")
    parser.add_argument("--quiet", action="store_true", help="no per-config progress lines")


def run(args: argparse.Namespace, command: str) -> int:
    from effkern.backend import triton_available, triton_interpret

    if not triton_available():
        print("effkern doctor --compile-gpu: triton is not installed", file=sys.stderr)
        return 2
    if triton_interpret():
        print("effkern doctor --compile-gpu: unset TRITON_INTERPRET (the interpreter does not compile)",
              file=sys.stderr)
        return 2
    try:
        archs = [int(a) for a in args.arch.split(",")]
        kw = {}
        if args.dtypes:
            kw["dtypes"] = tuple(args.dtypes.split(","))
            bad = [d for d in kw["dtypes"] if d not in DTYPE_NAMES]
            if bad:
                raise ValueError(f"--dtypes: unknown {bad}")
        if args.head_dims:
            kw["head_dims"] = tuple(int(h) for h in args.head_dims.split(","))
        if args.dims:
            kw["dims"] = tuple(int(d) for d in args.dims.split(","))
    except ValueError as exc:
        print(f"effkern doctor --compile-gpu: {exc}", file=sys.stderr)
        return 2
    unknown = [a for a in archs if a not in ARCHS]
    if unknown:
        print(f"effkern doctor --compile-gpu: --arch {unknown} not in {sorted(ARCHS)}", file=sys.stderr)
        return 2
    if args.kernels:
        known = set(discover())
        known |= {name.split(".")[-1] for name in known}
        unknown = [k for k in args.kernels.split(",") if k not in known]
        if unknown:
            print(f"effkern doctor --compile-gpu: --kernels {unknown} not among {sorted(known)}", file=sys.stderr)
            return 2
    started = time.perf_counter()

    def partial(results):  # a sweep cut short keeps what it compiled
        if args.out and len(results) % 10 == 0:
            write(args.out, results, command + "  (partial)")

    results = sweep(args.scope, archs, args.kernels.split(",") if args.kernels else None,
                    progress=None if args.quiet else (lambda s: print(s, flush=True)), on_result=partial, **kw)
    summary = summarize(results)
    print(f"\n{'kernel':<42}{'arch':<7}{'n':>4}{'fail':>5}{'regs':>6}{'spill':>6}{'smemKiB':>9}  lowering")
    for s in summary:
        print(f"{s['kernel']:<42}{s['arch']:<7}{s['compiles']:>4}{s['failed']:>5}{s['max_registers']!s:>6}"
              f"{s['spilling']:>6}{s['max_shared_kib']!s:>9}  {s['lowering']}")
    failed = [r for r in results if not r.passed]
    print(f"\n{len(results)} compiles in {time.perf_counter() - started:.0f}s: "
          f"{len(results) - len(failed)} pass, {len(failed)} fail")
    for r in failed[:20]:
        print(f"  FAIL sm_{r.arch} {r.kernel} {r.workload} {r.config}: {'; '.join(r.problems)} {r.error}")
    if args.out:
        write(args.out, results, command)
        print(f"wrote {args.out}.json and {args.out}.md")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m effkern.tools.gpu_compile", description=__doc__.split("\n")[0])
    add_arguments(parser)
    argv = sys.argv[1:] if argv is None else argv
    return run(parser.parse_args(argv), "python -m effkern.tools.gpu_compile " + " ".join(argv))


if __name__ == "__main__":
    sys.exit(main())
