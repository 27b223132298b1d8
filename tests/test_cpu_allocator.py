"""effkern.cpu_allocator: glibc keeps freed multi-MiB blocks for reuse (no page faults per
tensor), applied once, skipped when the user chose an allocator setting."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                           reason="glibc only")

# minor page faults of 20 allocate-fill-free cycles of a 16 MiB and a 64 MiB tensor, before /
# after tuning.  Untuned, only the 64 MiB count is deterministic: it is above glibc's largest
# dynamic mmap threshold (32 MiB on 64-bit), so every cycle maps fresh pages; whether a 16 MiB
# block is mmapped depends on what the process freed before (glibc raises the threshold to the
# size of a freed mmapped chunk), which differs between machines.
PROBE = r"""
import json, resource, sys, torch
from effkern.cpu_allocator import tune_cpu_allocator

def faults(mib):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        torch.empty(mib * 2**18).fill_(1.0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

out = {"untuned": faults(16), "untuned64": faults(64)}
out["state"] = tune_cpu_allocator()
out["again"] = tune_cpu_allocator()
faults(64)  # the first blocks after tuning still come from fresh pages
faults(16)
out["tuned"], out["tuned64"] = faults(16), faults(64)
print(json.dumps(out))
"""


def _probe(**env) -> dict:
    full = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "EFFKERN_CPU_ALLOCATOR"}
    full.update(env)
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=full, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc
def test_tuning_stops_the_page_faults_of_large_tensors():
    r = _probe()
    assert r["state"] == {"applied": True, "reason": "mallopt"} and r["again"] == r["state"]
    pages = 16 * 2**20 // 4096                  # of one 16 MiB tensor
    assert r["untuned64"] > 4 * 4 * pages, r     # untuned glibc returns 64 MiB blocks to the OS each time
    assert r["tuned"] < pages // 4 and r["tuned64"] < pages // 4, r   # freed blocks are reused


@glibc
@pytest.mark.parametrize("env, reason", [({"EFFKERN_CPU_ALLOCATOR": "0"}, "EFFKERN_CPU_ALLOCATOR=0"),
                                         ({"MALLOC_TRIM_THRESHOLD_": "1000000"}, "MALLOC_TRIM_THRESHOLD_ is set")])
def test_user_choice_wins(env, reason):
    r = _probe(**env)
    assert r["state"] == {"applied": False, "reason": reason}
