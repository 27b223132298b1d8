#!/usr/bin/env python3
"""check_compile.py -- compile checks of the CUDA kernels (csrc/cuda/*.cu) that need no GPU.

For every .cu file here and every architecture (default sm_90 and sm_80) it runs
  nvcc -cubin -arch=sm_XX -Xptxas -v  (device code only, the build's flags, into a private directory)
and reads, per kernel, ptxas' registers, stack frame, spill stores/loads and static
shared memory, then `cuobjdump -sass` of the cubin for the tensor-core instructions
(HMMA = mma.sync/wmma, HGMMA = sm_90 wgmma).  It fails (exit 1) when a kernel spills
or has a stack frame, or when a kernel of a tensor-core source (TENSOR_CORE_SOURCES)
has no HMMA/HGMMA.  Exit 2: bad arguments or nvcc/cuobjdump not found.

  python csrc/cuda/check_compile.py [--arch 90 80] [--build-dir DIR] [--json FILE]

It never touches effkern/_C (the extension others import): cubins go to --build-dir
(default: a fresh temporary directory).  cuobjdump is taken from CUDA_HOME/bin, PATH,
or the copy that ships with Triton's NVIDIA backend.  tests/test_fft_crop_tensorcore.py
runs it for sm_90 in CI when nvcc is installed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
CSRC = HERE.parent
TENSOR_CORE_SOURCES = {"fft_crop_tc_kernel.cu"}  # every kernel in these must run on tensor cores
TC_OPCODES = ("HGMMA", "HMMA")
# The device-code flags setup.py's build passes (its own plus torch.utils.cpp_extension's).
NVCC_FLAGS = ["-O3", "-lineinfo", "-std=c++20", "--expt-relaxed-constexpr", "-DEFFKERN_WITH_CUDA=1",
              "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
              "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]


def find_tool(name: str) -> str | None:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidates = [os.path.join(cuda_home, "bin", name), shutil.which(name)]
    if name == "cuobjdump":  # Triton's NVIDIA backend bundles one (located without importing triton)
        import importlib.util

        spec = importlib.util.find_spec("triton")
        if spec is not None and spec.origin:
            candidates.append(os.path.join(os.path.dirname(spec.origin), "backends", "nvidia", "bin", name))
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def _demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("c++filt")
    if tool is None or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def parse_ptxas(log: str) -> dict[str, dict]:
    """Per mangled kernel name: registers, stack, spill_stores, spill_loads, smem (static bytes)."""
    kernels: dict[str, dict] = {}
    current = None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            current = kernels.setdefault(m.group(1), {"registers": None, "stack": 0, "spill_stores": 0,
                                                       "spill_loads": 0, "smem": 0})
            continue
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            current = kernels.get(m.group(1), current)
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            current["stack"], current["spill_stores"], current["spill_loads"] = map(int, m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current["registers"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            current["smem"] = int(s.group(1)) if s else 0
    return kernels


def count_tensor_core_ops(sass: str) -> dict[str, dict[str, int]]:
    """Per mangled kernel name: how many SASS instructions of each tensor-core opcode."""
    counts: dict[str, dict[str, int]] = {}
    current = None
    for line in sass.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            current = counts.setdefault(m.group(1), {op: 0 for op in TC_OPCODES})
            continue
        if current is None:
            continue
        m = re.search(r"/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
        if m:
            for op in TC_OPCODES:
                if m.group(1) == op:
                    current[op] += 1
    return counts


def check_source(src: Path, arch: int, build_dir: Path, nvcc: str, cuobjdump: str) -> list[dict]:
    cubin = build_dir / f"{src.stem}.sm_{arch}.cubin"
    cmd = [nvcc, "-cubin", *NVCC_FLAGS, f"-arch=sm_{arch}", "-Xptxas", "-v", "-I", str(CSRC), str(src),
           "-o", str(cubin)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return [{"source": src.name, "arch": arch, "kernel": "(compile)", "ok": False,
                 "problems": ["nvcc failed: " + (proc.stderr.strip().splitlines() or ["?"])[-1]]}]
    stats = parse_ptxas(proc.stdout + proc.stderr)
    sass = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    tc = count_tensor_core_ops(sass)
    names = _demangle(sorted(stats))
    rows = []
    for mangled in sorted(stats):
        st = stats[mangled]
        ops = tc.get(mangled, {op: 0 for op in TC_OPCODES})
        problems = []
        if st["spill_stores"] or st["spill_loads"]:
            problems.append(f"spills {st['spill_stores']}/{st['spill_loads']} bytes (stores/loads)")
        if st["stack"]:
            problems.append(f"{st['stack']} bytes stack frame")
        if src.name in TENSOR_CORE_SOURCES and not any(ops.values()):
            problems.append("no HMMA/HGMMA in its SASS")
        rows.append({"source": src.name, "arch": arch, "kernel": names[mangled], "registers": st["registers"],
                     "stack": st["stack"], "spill_stores": st["spill_stores"], "spill_loads": st["spill_loads"],
                     "smem_static": st["smem"], **{op.lower(): ops[op] for op in TC_OPCODES},
                     "ok": not problems, "problems": problems})
    if not rows:
        rows.append({"source": src.name, "arch": arch, "kernel": "(none)", "ok": False,
                     "problems": ["ptxas reported no kernels"]})
    return rows


def run(archs: list[int], build_dir: Path, sources: list[Path] | None = None) -> list[dict]:
    nvcc, cuobjdump = find_tool("nvcc"), find_tool("cuobjdump")
    if nvcc is None or cuobjdump is None:
        raise FileNotFoundError(f"{'nvcc' if nvcc is None else 'cuobjdump'} not found (set CUDA_HOME)")
    sources = sources or sorted(HERE.glob("*.cu"))
    build_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(src, arch) for src in sources for arch in archs]
    with ThreadPoolExecutor(max_workers=int(os.environ.get("MAX_JOBS", "2"))) as pool:
        results = pool.map(lambda job: check_source(job[0], job[1], build_dir, nvcc, cuobjdump), jobs)
    return [row for rows in results for row in rows]


def _short(kernel: str) -> str:
    return re.sub(r"\(anonymous namespace\)::|effkern::", "", kernel)


def format_table(rows: list[dict]) -> str:
    lines = ["| arch | source | kernel | regs | stack | spill st/ld | smem | HMMA | HGMMA | ok |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "registers" not in r:
            lines.append(f"| sm_{r['arch']} | {r['source']} | {r['kernel']} | | | | | | | "
                         f"FAIL: {'; '.join(r['problems'])} |")
            continue
        ok = "ok" if r["ok"] else "FAIL: " + "; ".join(r["problems"])
        lines.append(f"| sm_{r['arch']} | {r['source']} | `{_short(r['kernel'])}` | {r['registers']} | "
                     f"{r['stack']} | {r['spill_stores']}/{r['spill_loads']} | {r['smem_static']} | {r['hmma']} | "
                     f"{r['hgmma']} | {ok} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], help="SM architectures, e.g. 90 80")
    parser.add_argument("--build-dir", type=Path, default=None, help="where the cubins go (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    parser.add_argument("--source", type=Path, nargs="*", default=None, help="only these .cu files")
    args = parser.parse_args(argv)
    if any(a < 50 or a > 200 for a in args.arch):
        parser.error(f"--arch: expected SM numbers like 90 or 80, got {args.arch}")
    for src in args.source or []:
        if src.suffix != ".cu" or not src.is_file():
            parser.error(f"--source: {src} is not a .cu file")
    tmp = None
    build_dir = args.build_dir
    if build_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="effkern-nvcc-check-")
        build_dir = Path(tmp.name)
    try:
        rows = run(args.arch, build_dir, [s.resolve() for s in args.source] if args.source else None)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if tmp is not None:
            tmp.cleanup()
    print(format_table(rows))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    bad = [r for r in rows if not r["ok"]]
    print(f"\n{len(rows) - len(bad)}/{len(rows)} kernel builds ok" + (f", {len(bad)} FAILED" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
