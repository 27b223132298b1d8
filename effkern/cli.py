"""``effkern`` console script: thin argument parsing over the library."""

from __future__ import annotations

import sys


def _bench(argv: list[str]) -> int:
    import os

    from effkern import bench
    from effkern.bench.common import environment, format_table, int_at_least, write_results
    from effkern.cli_train import _check_device, _Parser

    names = bench.available()
    parser = _Parser(prog="effkern bench", description="Microbenchmarks against peers.")
    parser.add_argument("name", help=f"one of: {', '.join(names)}")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--repeat", type=int_at_least(1), default=10,
                        help="timed calls per measurement (median reported)")
    parser.add_argument("--out", default=None, help="write <out>.json and <out>.md with the table")
    parser.add_argument("--threads", type=int_at_least(1), default=None,
                        help="CPU threads (torch.set_num_threads; 1 = what a DataLoader worker gets)")
    try:
        if argv and not argv[0].startswith("-"):
            bench.load(argv[0]).add_arguments(parser)  # its options, before they are parsed
        args = parser.parse_args(argv)
        module = bench.load(args.name)
        if args.device is not None:
            _check_device("--device", args.device)
        if args.out and not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
            raise ValueError(f"--out {args.out}: the directory {os.path.dirname(os.path.abspath(args.out))} "
                             "does not exist")
    except ValueError as exc:
        parser.error(str(exc))
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if device.type == "cpu":  # the same allocator settings for every implementation timed
        from effkern.cpu_allocator import tune_cpu_allocator

        tune_cpu_allocator()
    title = f"effkern bench {args.name} on {environment(device)['device_name']} ({device})"
    extra_cols = getattr(module, "TABLE_EXTRA", ())
    command = "effkern bench " + " ".join(argv)
    shown = 0

    def partial(rows):  # effkern.bench.common.report_partial: a run cut short keeps these
        nonlocal shown
        print(format_table(rows[shown:], extra_cols=extra_cols), flush=True)
        shown = len(rows)
        if args.out:
            write_results(args.out, rows, environment(device), command, title + " (partial: run in progress)",
                          extra_cols=extra_cols)

    args.partial_hook = partial
    try:
        rows = module.run(args)
    except ValueError as exc:  # effkern's own argument checks on a combination of options
        parser.error(str(exc))
    print(format_table(rows, title, extra_cols=extra_cols))
    if args.out:
        write_results(args.out, rows, environment(device), command, title, extra_cols=extra_cols)
    return 0


# command -> (module, function); each module is imported only when its command runs
COMMANDS = {
    "train": ("effkern.cli_train", "train_main"),
    "bench": ("effkern.cli", "_bench"),
    "schedule": ("effkern.cli_train", "schedule_main"),
    "demo": ("effkern.cli_train", "demo_main"),
    "doctor": ("effkern.tools.doctor", "doctor_main"),
}
# what a command imports beyond torch and numpy: the extra that installs it
_NEEDS = {"train": ("train", ("timm", "matplotlib", "tqdm")),
          "demo": ("train", ("timm", "matplotlib", "tqdm")),
          "schedule": ("timm", ("timm",))}
USAGE = ("usage: effkern {train,bench,schedule,demo,doctor} ...\n\n"
         "  train        train a ViT under a compute budget with a compression schedule\n"
         "  bench NAME   microbenchmarks against peers (effkern bench --help)\n"
         "  schedule     inspect schedules: effkern schedule show NAME\n"
         "  demo         baseline vs accelerated MoCo v3 at the same budget (CPU, minutes)\n"
         "  doctor       build info; --compile-gpu: compile every Triton kernel for sm_90/sm_80 (no GPU needed)")


def missing_packages(command: str) -> str | None:
    """One line naming the packages ``command`` needs that are not installed and the extra
    that installs them, or None.  find_spec only: nothing is imported."""
    from importlib.util import find_spec

    extra, modules = _NEEDS.get(command, ("", ()))
    missing = [m for m in modules if find_spec(m) is None]
    if not missing:
        return None
    return f"effkern {command}: needs {', '.join(missing)}, not installed: pip install 'effkern[{extra}]'"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(USAGE, file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    problem = missing_packages(argv[0])
    if problem and not any(a in ("-h", "--help") for a in argv[1:]):
        print(problem, file=sys.stderr)
        return 2
    import importlib

    module, function = COMMANDS[argv[0]]
    return getattr(importlib.import_module(module), function)(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
