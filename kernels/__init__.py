"""specmesh kernels: each Triton kernel beside its torch reference, dispatched in one place.

Importing this package never needs triton (it is an optional extra); the Triton paths import it
lazily and the dispatchers fall back to the torch references on CPU or when it is missing.

Note: ``specmesh.kernels.tree_attention`` as an *attribute* is the dispatch function below (it
shadows the subpackage of the same name); ``from specmesh.kernels.tree_attention import ...`` still
reaches the subpackage. Use ``importlib.import_module`` to get the module object itself.
"""
from __future__ import annotations

from .tree_attention import (
    TreeLayout,
    select_backend as select_attention_backend,
    tree_attention,
    tree_attention_reference,
    tree_attention_triton,
)

__all__ = [
    "TreeLayout",
    "select_attention_backend",
    "tree_attention",
    "tree_attention_reference",
    "tree_attention_triton",
]
