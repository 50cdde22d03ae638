"""Sparse Mixture-of-Experts: the layer, its routers, capacity rules, dispatch paths, exchanges.

layer.py (the module) reads routers.py (the router registry), capacity.py (groups, capacity,
slots), dispatch.py (paths and the grouped-matmul table) and exchange.py (shard_maps).
"""

from glam_jax.moe.capacity import MoEError
from glam_jax.moe.layer import MoE

__all__ = ["MoE", "MoEError"]
