"""Parallel attention strategies on torch.distributed, each with residual compression.

``ParallelContext(ParallelConfig(...))`` after ``init_process_group``; then
``ctx.attention(q, k, v, layer=, step=[, joint_q=, joint_k=, joint_v=])`` on local shards (B, S_local, H, D).
Strategies: none, patch, distrifusion, ring, ulysses, usp (one module each); CFG parallelism splits the
world in two halves.
"""
from .config import DEFAULT_TENSORS, STRATEGIES, Mesh, ParallelConfig
from .context import Joint, ParallelContext
from .errors import CommError, CommTimeoutError, ConfigMismatchError, ConsistencyError, ShapeMismatchError
from .local_attention import OnlineSoftmax, attention_with_lse, merge_partials, reference_attention
from .sharding import shard, shard_offsets, shard_sizes

__all__ = ["ParallelConfig", "ParallelContext", "Mesh", "Joint", "STRATEGIES", "DEFAULT_TENSORS",
           "ConsistencyError", "ConfigMismatchError", "ShapeMismatchError", "CommError", "CommTimeoutError",
           "attention_with_lse", "merge_partials", "OnlineSoftmax", "reference_attention",
           "shard_sizes", "shard_offsets", "shard"]
