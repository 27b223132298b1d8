"""Shared pieces of ``effkern bench``: timing, bandwidth ceilings, tables, JSON, and the
argparse types of the benchmarks' options (a bad value is one line naming the option).

Timing protocol: warm-up calls first (compilation, caches, allocator), then
``repeat`` timed calls; the median is reported.  On CUDA each call is timed with
CUDA events; on CPU with ``time.perf_counter`` (the ops are synchronous there).
Inputs should be random (never zeros) and, for cache-sized problems, rotated.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch


@dataclass
class Row:
    """One line of a benchmark table: one implementation on one shape."""

    op: str
    shape: str
    impl: str
    dtype: str
    ms: float
    gbps: float | None = None          # bytes that must move / time
    tflops: float | None = None
    roofline_pct: float | None = None  # % of the measured ceiling (bandwidth or FLOP/s)
    rel_err: float | None = None       # vs the float64 oracle
    ratios: dict = field(default_factory=dict)  # peer name -> peer_ms / our_ms (>1: we are faster)
    extra: dict = field(default_factory=dict)


def int_at_least(low: int) -> Callable[[str], int]:
    """argparse type: an int >= ``low`` (argparse names the option in the error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an int") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def comma_list(kind: Callable[[str], object], what: str, ok: Callable[[object], bool]) -> Callable[[str], str]:
    """argparse type: a comma list (``1,0.5``) whose every item converts with ``kind`` and
    passes ``ok``, else an error naming the item and ``what`` it must be.  The text is
    returned unchanged (the benchmark splits it when it fills in its defaults)."""

    def parse(text: str) -> str:
        for item in str(text).split(","):
            try:
                value = kind(item.strip())
            except ValueError:
                value = None
            if value is None or not ok(value):
                where = "" if item == text else f" (in {text!r})"
                raise argparse.ArgumentTypeError(f"{item.strip()!r}{where} is not {what}")
        return text

    return parse


def keep_ratio(value: float) -> bool:
    return 0.0 < value <= 1.0


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device, warmup: int = 3, repeat: int = 10,
            min_time_s: float = 0.0) -> float:
    """Median wall time of ``fn()`` in milliseconds."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times: list[float] = []
    deadline = time.perf_counter() + min_time_s
    while len(times) < repeat or time.perf_counter() < deadline:
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        if len(times) >= 10 * repeat:
            break
    return statistics.median(times)


def measured_copy_bandwidth(device: torch.device, nbytes: int = 1 << 28) -> float:
    """Device memory bandwidth in GB/s (bytes read + bytes written) of a large copy."""
    n = nbytes // 4
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    ms = time_fn(lambda: dst.copy_(src), device, warmup=2, repeat=10)
    return 2 * n * 4 / (ms * 1e-3) / 1e9


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 on the CPU (||out - ref|| when ref is all zeros): the
    one relative-error measure of effkern's benchmarks and tests (tests/oracles.py)."""
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    denom = ref64.norm().item()
    num = (out64 - ref64).norm().item()
    return num / denom if denom > 0 else num


def report_partial(args, rows: Sequence[Row]) -> None:
    """A benchmark calls this after each finished group of rows (a workload, a model):
    the CLI prints the new rows and rewrites ``--out`` with every row so far, so a run
    cut at a time limit keeps what finished.  A no-op when nobody listens."""
    hook = getattr(args, "partial_hook", None)
    if hook is not None:
        hook(list(rows))


def environment(device: torch.device) -> dict:
    info = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "device": str(device),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:
        info["triton"] = None
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    else:
        info["device_name"] = _cpu_model() or platform.processor() or platform.machine()
    from effkern import build_info

    info["effkern_cpu_isa"] = build_info().get("cpu_isa")
    from effkern.cpu_allocator import status

    info["cpu_allocator"] = status().get("reason", "untouched")
    return info


def _cpu_model() -> str | None:
    """The CPU's model name (Linux /proc/cpuinfo), e.g. 'AMD EPYC'."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _fmt_extra(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value, ".3g") if abs(value) < 1e4 else format(value, ".0f")
    return str(value)


def format_table(rows: Sequence[Row], title: str = "", extra_cols: Sequence[str] = ()) -> str:
    """A markdown table; peers' ratios become one column each (peer_ms / our_ms);
    ``extra_cols`` names ``Row.extra`` keys shown as further columns."""
    peers: list[str] = []
    for row in rows:
        for peer in row.ratios:
            if peer not in peers:
                peers.append(peer)
    header = (["shape", "impl", "dtype", "ms", "GB/s", "TFLOP/s", "% roof", "rel err"] + [f"vs {p}" for p in peers]
              + list(extra_cols))
    lines = []
    if title:
        lines.append(f"### {title}\n")
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for r in rows:
        cells = [r.shape, r.impl, r.dtype, _fmt(r.ms, ".3f"), _fmt(r.gbps, ".1f"), _fmt(r.tflops, ".2f"),
                 _fmt(r.roofline_pct, ".1f"), _fmt(r.rel_err, ".1e")]
        cells += [(f"{r.ratios[p]:.2f}x" if p in r.ratios else "") for p in peers]
        cells += [_fmt_extra(r.extra.get(k)) for k in extra_cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(path_stem: str, rows: Sequence[Row], env: dict, command: str, title: str,
                  extra_cols: Sequence[str] = ()) -> None:
    """Write ``<stem>.json`` and ``<stem>.md`` (device, versions, date, command, table)."""
    os.makedirs(os.path.dirname(path_stem) or ".", exist_ok=True)
    with open(path_stem + ".json", "w") as f:
        json.dump({"env": env, "command": command, "rows": [asdict(r) for r in rows]}, f, indent=1)
    with open(path_stem + ".md", "w") as f:
        f.write(f"# {title}\n\n")
        f.write(f"- device: {env.get('device_name')} ({env.get('device')})\n")
        f.write(f"- torch {env.get('torch')}, triton {env.get('triton')}, python {env.get('python')}, "
                f"CPU threads {env.get('cpu_threads')}, effkern CPU kernels: {env.get('effkern_cpu_isa')}, "
                f"CPU allocator: {env.get('cpu_allocator')}\n")
        f.write(f"- date: {env.get('date')}\n- command: `{command}`\n\n")
        f.write(format_table(rows, extra_cols=extra_cols) + "\n")
