"""Prometheus metrics of a model service's KV pool, labelled by pool ("draft" / "target")."""
from __future__ import annotations

from prometheus_client import Counter, Gauge

PREFIX_HIT_TOKENS = Counter("specmesh_pool_prefix_hit_tokens", "prompt tokens whose KV was copied from the prefix "
                                                             "cache instead of prefilled", ["pool"])
PREFIX_MISS_TOKENS = Counter("specmesh_pool_prefix_miss_tokens", "prompt tokens prefilled (no valid cached KV)",
                             ["pool"])
EVICTIONS = Counter("specmesh_pool_evictions", "prefix-cache entries evicted to make room", ["pool"])
CACHED_BLOCKS = Gauge("specmesh_pool_cached_blocks", "blocks held by finished sessions' prefix-cache entries", ["pool"])
COMPACTIONS = Counter("specmesh_pool_compactions", "pool compactions (enough free blocks, but no run big enough)",
                      ["pool"])
