"""Prometheus metrics of the draft: tree growth, re-roots, idle time."""
from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

EXPANSIONS = Counter("specmesh_draft_expansions", "session expansions (w leaves each; several per batched forward)")
EXPAND = Histogram("specmesh_draft_expand_seconds", "one batched draft forward (every session's expansion or catch-up)",
                   buckets=(0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5))
REROOTS = Counter("specmesh_draft_reroots", "re-roots on verified tokens", ["result"])  # hit | new_tree
REROOT = Histogram("specmesh_draft_reroot_seconds", "re-root + compaction (a miss's catch-up runs in the next step)",
                   buckets=(0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.2))
IDLE = Counter("specmesh_draft_idle_seconds", "time a session's tree was done growing before its verified tokens came")
SUBTREE = Histogram("specmesh_draft_subtree_size", "nodes per subtree sent", buckets=(1, 2, 4, 8, 16, 24, 32, 48, 64))
TREE_NODES = Histogram("specmesh_draft_tree_nodes", "nodes in the tree when its subtree was sent",
                       buckets=(4, 8, 16, 32, 64, 128, 256, 512))
SESSIONS = Gauge("specmesh_draft_sessions_active", "sessions on the draft")
STEP_SESSIONS = Histogram("specmesh_draft_step_sessions", "sessions in one batched draft forward",
                          buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32))
PLANNED_SIZE = Histogram("specmesh_draft_planned_subtree_size", "subtree size the planner chose (1 = plain decoding)",
                         buckets=(1, 2, 4, 8, 12, 16, 24, 32, 48, 64))
PREDICTED_TOKENS = Gauge("specmesh_draft_predicted_tokens_per_round",
                         "tokens the last planned subtree is expected to commit (accepted + bonus)")
PREDICTED_STEP_MS = Gauge("specmesh_draft_predicted_step_ms",
                          "target step time the planner predicted for its last choice (all sessions' rows)")
PAUSES = Counter("specmesh_draft_pauses", "greedy sessions handed to the target alone because speculation did not "
                 "pay (paused; started_paused: opened under such a load; held_by_load: running when the load "
                 "reached it), and looked at again (resumed)",
                 ["event"])
PAUSED = Gauge("specmesh_draft_paused_sessions", "sessions the target runs alone now (paused)")
YIELD_TOKENS = Gauge("specmesh_draft_yield_tokens_per_round", "tokens verified speculative rounds committed lately "
                     "(accepted + bonus; the planner's RoundYield)")
YIELD_NODES = Gauge("specmesh_draft_yield_nodes_per_round", "nodes those rounds sent, root included")
ROUND_OVERHEAD = Gauge("specmesh_draft_round_overhead_ms", "what a round costs besides the target's forward, as the "
                       "planner learned it")
PLAIN_LOAD = Gauge("specmesh_draft_plain_load_sessions", "the least number of sessions the planner's verdict calls a "
                   "plain load now (0: none up to 64, or no verdict yet)")
