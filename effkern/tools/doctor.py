"""``effkern doctor``: what this install was built with, and (``--compile-gpu``) whether
every Triton kernel compiles for Hopper and Ampere without spills, within shared
memory and on tensor cores -- on any machine, no GPU needed (effkern.tools.gpu_compile)."""

from __future__ import annotations

import argparse
import json


def doctor_main(argv: list[str]) -> int:
    from effkern.tools import gpu_compile

    parser = argparse.ArgumentParser(prog="effkern doctor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--compile-gpu", action="store_true",
                        help="compile every Triton kernel x autotune config for sm_90 and sm_80 (exit 1 on a failure)")
    gpu_compile.add_arguments(parser)
    args = parser.parse_args(argv)
    import effkern

    print(json.dumps(effkern.build_info(), indent=1))
    if not args.compile_gpu:
        return 0
    return gpu_compile.run(args, "effkern doctor " + " ".join(argv))
