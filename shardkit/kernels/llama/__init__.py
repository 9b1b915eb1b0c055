"""Device code of a Llama block's local (communication-free) steps in the tensor-parallel model:
RoPE + KV-cache write straight from the fused q/k/v projection, and SwiGLU. Each replaces a chain
of small torch kernels that a decode step would otherwise launch per block."""
from .rope_cache import rope_qkv_into_cache
from .swiglu import swiglu

__all__ = ["rope_qkv_into_cache", "swiglu"]
