"""Public ops.  Each lives in its own module: schema, fake kernel, autograd and
dispatch sit together; the kernels live in ``effkern/kernels`` (Triton) and
``csrc/`` (C++/CUDA).  Every op is also reachable as ``torch.ops.effkern.*``.
"""

from effkern.ops.fft_crop import fft_crop

__all__ = ["fft_crop"]
