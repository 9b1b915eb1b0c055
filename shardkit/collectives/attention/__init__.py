"""Context-parallel attention over a process group: ring attention (pass-KV / pass-Q, ``ring``),
its plan and transport, CP decode (``cp_decode``), and the load-balanced sequence sharding."""
from .cp_decode import cp_decode_attention, decode_cache_rank
from .ring import PASS_Q_MISS_RATE, VARIANTS, choose_variant, ring_attention
from .sharding import shard, shard_positions, unshard

__all__ = ["ring_attention", "choose_variant", "cp_decode_attention", "decode_cache_rank", "shard", "unshard",
           "shard_positions", "PASS_Q_MISS_RATE", "VARIANTS"]
