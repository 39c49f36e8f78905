"""Conversions between protobuf messages and runtime types, shared by every service."""
from __future__ import annotations

from specmesh.v1 import generation_pb2, mesh_pb2

from .errors import InvalidRequest
from .prefix_cache import PoolSnapshot
from .sampling import SamplingParams
from .tree_params import TreeParams

FINISH_REASONS = {
    None: generation_pb2.FINISH_REASON_UNSPECIFIED,
    "stop": generation_pb2.FINISH_REASON_STOP,
    "length": generation_pb2.FINISH_REASON_LENGTH,
    "eos": generation_pb2.FINISH_REASON_EOS,
    "abort": generation_pb2.FINISH_REASON_ABORT,
}
FINISH_NAMES = {v: k for k, v in FINISH_REASONS.items()}


def sampling_from_proto(opts: generation_pb2.SamplingOptions) -> SamplingParams:
    """Validates as it converts (raises InvalidRequest); an unset top_p means 1 (off)."""
    return SamplingParams(temperature=opts.temperature, top_p=opts.top_p if opts.HasField("top_p") else 1.0,
                          top_k=opts.top_k,
                          seed=opts.seed if opts.HasField("seed") else None)


def sampling_to_proto(params: SamplingParams) -> generation_pb2.SamplingOptions:
    opts = generation_pb2.SamplingOptions(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)
    if params.seed is not None:
        opts.seed = params.seed
    return opts


def tree_from_proto(opts: mesh_pb2.TreeOptions) -> TreeParams:
    return TreeParams(width=opts.width, subtree_size=opts.subtree_size, depth=opts.depth, max_tree=opts.max_tree)


def lease_blocks(lease: mesh_pb2.BlockLease, block_size: int) -> int:
    """The blocks treekv admitted a session for, checked against this pool's block size."""
    if lease.num_blocks <= 0:
        raise InvalidRequest("no KV lease given")
    if lease.block_size and lease.block_size != block_size:
        raise InvalidRequest(f"the lease counts blocks of {lease.block_size} slots, this pool's hold {block_size} "
                             f"(treekv has a stale registration of this pool)")
    return lease.num_blocks


def prefix_hint(lease: mesh_pb2.BlockLease) -> tuple[str, int] | None:
    """treekv's prefix-cache hint in a lease, as (entry id, tokens); None when it gave none."""
    if not lease.HasField("prefix") or not lease.prefix.entry_id or lease.prefix.num_tokens <= 0:
        return None
    return lease.prefix.entry_id, lease.prefix.num_tokens


def pool_report(snapshot: PoolSnapshot, reserve_slots: int) -> mesh_pb2.PoolReport:
    return mesh_pb2.PoolReport(num_blocks=snapshot.num_blocks, block_size=snapshot.block_size,
                               reserve_slots=reserve_slots, cached_entries=snapshot.cached_entries,
                               cached_blocks=snapshot.cached_blocks)


def service_timing(snapshot: PoolSnapshot, reserve_slots: int, **fields: object) -> mesh_pb2.ServiceTiming:
    """A model service's Info: `fields` plus its pool (pool_blocks_used counts live sessions only)."""
    return mesh_pb2.ServiceTiming(pool_blocks_used=snapshot.used_blocks, pool_blocks_total=snapshot.num_blocks,
                                  pool=pool_report(snapshot, reserve_slots), **fields)
