"""The parts of an op's torch.library registration that every effkern op module writes
the same way (docs/architecture.md, "How an op is registered").

- :data:`PT2_COMPLIANT`: the tags of every schema, ``_lib.define(schema, tags=PT2_COMPLIANT)``
  (C++ schemas: ``m.def(schema, {at::Tag::pt2_compliant_tag})``).  The tag tells
  torch.compile that the op passes ``torch.library.opcheck`` (each op's tests run it).
- :func:`forbid_double_backward`: the autograd kernel of a backward op that has no
  derivative.  Without one, torch only warns in a double backward and treats the op
  as a constant there (a silently wrong second derivative), or fails somewhere
  inside the kernel; with it, the double backward raises a RuntimeError naming the op.
"""

from __future__ import annotations

import torch

PT2_COMPLIANT = (torch.Tag.pt2_compliant_tag,)


def forbid_double_backward(public_name: str, *backward_ops: str) -> None:
    """Register, on each ``effkern::<backward_op>``, an autograd kernel whose backward
    raises ``RuntimeError("double backward through effkern <public_name> is not
    supported ...")``.  The first backward (which calls these ops) is unaffected."""
    ops = "/".join(f"effkern::{op}" for op in backward_ops)
    plural = len(backward_ops) > 1
    message = (f"double backward through effkern {public_name} is not supported "
               f"(its backward op{'s' if plural else ''} {ops} {'have' if plural else 'has'} no derivative)")

    def _raise(ctx, *grads):
        raise RuntimeError(message)

    for op in backward_ops:
        torch.library.register_autograd(f"effkern::{op}", _raise)
