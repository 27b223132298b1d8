"""Public ops.  Each lives in its own module: schema, fake kernel, autograd and
dispatch sit together; the kernels live in ``effkern/kernels`` (Triton) and
``csrc/`` (C++/CUDA).  Every op is also reachable as ``torch.ops.effkern.*``.
"""

from effkern.ops.fft_crop import fft_crop
from effkern.ops.patch_embed import patch_embed
from effkern.ops.sample_keep import sample_keep
from effkern.ops.varlen_attention import varlen_attention, varlen_attention_qkvpacked

__all__ = ["fft_crop", "patch_embed", "sample_keep", "varlen_attention", "varlen_attention_qkvpacked"]
