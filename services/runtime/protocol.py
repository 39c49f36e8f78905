"""Conversions between protobuf messages and runtime types, shared by every service."""
from __future__ import annotations

from specmesh.v1 import generation_pb2, mesh_pb2

from .tree_params import TreeParams
from .sampling import SamplingParams

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
