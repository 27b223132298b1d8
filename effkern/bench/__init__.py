"""``effkern bench NAME``: one module per benchmark, ``effkern/bench/NAME.py``,
each exposing ``add_arguments(parser)`` and ``run(args) -> list[Row]``."""

from __future__ import annotations

import importlib
import pkgutil


def available() -> list[str]:
    import effkern.bench as pkg

    return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__)
                  if m.name != "common" and not m.name.startswith("_"))


def load(name: str):
    names = available()
    if name not in names:
        raise ValueError(f"unknown benchmark {name!r}; available: {', '.join(names)}")
    return importlib.import_module(f"effkern.bench.{name}")
