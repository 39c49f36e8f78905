"""A radix tree over token sequences: which cache entry holds the KV of the longest prefix of a prompt.

One index per pool (a pair's draft or target). An entry is a session's KV in that pool: a running
session's prompt (being prefilled: the service waits for it), or a finished session's prompt plus
output, cut to the tokens whose KV is valid. The index is a hint: the service checks an entry's
tokens before copying from it, so a stale entry costs a miss, never a wrong output.

Edges are compressed (a node holds the run of tokens from its parent), and every node keeps the
set of entries whose tokens run through it, so a lookup is one walk down the prompt: O(prompt) list
comparisons, however many entries there are.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class _Node:
    edge: list[int]                                  # tokens from the parent to this node
    children: dict[int, "_Node"] = field(default_factory=dict)  # keyed by the child edge's first token
    entries: set[str] = field(default_factory=set)   # entries whose tokens cover this whole path


@dataclass(frozen=True)
class PrefixMatch:
    """`entry_id`'s KV holds the first `num_tokens` tokens of the looked-up sequence."""

    entry_id: str
    num_tokens: int


class PrefixIndex:
    """Entries (id -> token sequence) in a radix tree, for longest-prefix lookups."""

    def __init__(self) -> None:
        self._root = _Node([])
        self._tokens: dict[str, list[int]] = {}
        self._recency: dict[str, int] = {}  # higher = inserted or matched more recently
        self._clock = 0

    def __len__(self) -> int:
        return len(self._tokens)

    def __contains__(self, entry_id: str) -> bool:
        return entry_id in self._tokens

    def entry_ids(self) -> list[str]:
        """Every entry id, in no particular order."""
        return list(self._tokens)

    def tokens(self, entry_id: str) -> list[int]:
        """A copy of an entry's tokens (KeyError if absent)."""
        return list(self._tokens[entry_id])

    def insert(self, entry_id: str, tokens: list[int]) -> None:
        """Add (or replace) an entry holding the KV of `tokens`; an empty sequence adds nothing."""
        self.remove(entry_id)
        if not tokens:
            return
        self._tokens[entry_id] = list(tokens)
        self._touch(entry_id)
        node, i = self._root, 0
        while i < len(tokens):
            child = node.children.get(tokens[i])
            if child is None:
                leaf = _Node(list(tokens[i:]), entries={entry_id})
                node.children[tokens[i]] = leaf
                return
            common = _common_prefix(child.edge, tokens, i)
            if common < len(child.edge):  # split the edge where the sequences part
                upper = _Node(child.edge[:common], entries=set(child.entries))
                child.edge = child.edge[common:]
                upper.children[child.edge[0]] = child
                node.children[tokens[i]] = upper
                child = upper
            child.entries.add(entry_id)
            node, i = child, i + common

    def remove(self, entry_id: str) -> bool:
        """Drop an entry; returns False if it was not there. Nodes no entry runs through are pruned."""
        tokens = self._tokens.pop(entry_id, None)
        self._recency.pop(entry_id, None)
        if tokens is None:
            return False
        node, i = self._root, 0
        while i < len(tokens):
            child = node.children[tokens[i]]
            child.entries.discard(entry_id)
            if not child.entries:
                del node.children[tokens[i]]
                return True
            node, i = child, i + len(child.edge)
        return True

    def match(self, tokens: list[int], limit: int | None = None) -> PrefixMatch | None:
        """The entry holding the longest prefix of `tokens` (at most `limit` of them), or None.

        Among entries that cover the same length, the most recently inserted or matched wins (it is
        the least likely to have been evicted by its service).
        """
        limit = len(tokens) if limit is None else min(limit, len(tokens))
        node, i, best = self._root, 0, None
        while i < limit:
            child = node.children.get(tokens[i])
            if child is None:
                break
            common = _common_prefix(child.edge, tokens, i, limit)
            best = (child.entries, i + common)
            if common < len(child.edge):
                break
            node, i = child, i + common
        if best is None:
            return None
        entries, length = best
        entry_id = max(entries, key=self._recency.__getitem__)
        self._touch(entry_id)
        return PrefixMatch(entry_id, length)

    def _touch(self, entry_id: str) -> None:
        self._clock += 1
        self._recency[entry_id] = self._clock


def _common_prefix(edge: list[int], tokens: list[int], start: int, end: int | None = None) -> int:
    """How many leading tokens of `edge` equal tokens[start:end]."""
    end = len(tokens) if end is None else end
    n = min(len(edge), end - start)
    for k in range(n):
        if edge[k] != tokens[start + k]:
            return k
    return n
