"""Model-level users of shardkit's collectives: a tensor-parallel Llama with Sync-Point Drop blocks
(llama_tp.py, sync_points.py) and the SPD quality tools (spd.py: sensitivity, block-to-block
distillation, head grouping)."""
from .checkpoint import LayerWeights, LlamaConfig, LlamaWeights, load_llama
from .llama_tp import RankShard, TPLlama, contiguous_head_groups, shard_llama
from .sync_points import FusedSync, LocalSync, UnfusedSync

__all__ = ["LlamaConfig", "LlamaWeights", "LayerWeights", "load_llama", "shard_llama", "contiguous_head_groups",
           "RankShard", "TPLlama", "FusedSync", "UnfusedSync", "LocalSync"]
