"""Seeds for independent random streams derived from a few integers (a run seed, an
epoch, an index, ...): a splitmix64 chain, well mixed and collision-free in practice,
so that e.g. the views of sample i in epoch e are fixed by (seed, e, i) alone."""

from __future__ import annotations

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix_seed(first: int, *rest: int) -> int:
    """A 63-bit generator seed (fits torch.Generator.manual_seed) from the integers given."""
    h = _splitmix64(int(first) & _MASK64)
    for value in rest:
        h = _splitmix64(h ^ (int(value) & _MASK64))
    return h & ((1 << 63) - 1)
