"""Public ops.  Each lives in its own module: schema, fake kernel, autograd and
dispatch sit together; the kernels live in ``effkern/kernels`` (Triton) and
``csrc/`` (C++/CUDA).  Every op is also reachable as ``torch.ops.effkern.*``.
"""

from effkern.ops.fft_crop import fft_crop

__all__ = ["fft_crop"]
from effkern.ops.patch_embed import patch_embed; from effkern.ops.sample_keep import sample_keep; __all__ += ["patch_embed", "sample_keep"]  # noqa: E402,E702
from effkern.ops.varlen_attention import varlen_attention, varlen_attention_qkvpacked; __all__ += ["varlen_attention", "varlen_attention_qkvpacked"]  # noqa: E402,E702
