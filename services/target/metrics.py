"""Prometheus metrics of the target (named like vLLM's spec-decode metrics where they mean the same)."""
from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

NUM_DRAFTS = Counter("specmesh_spec_decode_num_drafts", "speculation rounds (trees verified)")
NUM_DRAFT_TOKENS = Counter("specmesh_spec_decode_num_draft_tokens", "draft tokens verified (tree nodes but the root)")
NUM_ACCEPTED = Counter("specmesh_spec_decode_num_accepted_tokens", "draft tokens accepted")
ACCEPTED_PER_POS = Counter("specmesh_spec_decode_num_accepted_tokens_per_pos",
                           "rounds that accepted a draft token at this depth", ["position"])
ROUNDS = Counter("specmesh_target_rounds", "target forwards per session step", ["mode"])
TOKENS = Counter("specmesh_target_generated_tokens", "tokens committed (accepted + bonus)")
TREE_SIZE = Histogram("specmesh_tree_size", "nodes per verified tree", buckets=(1, 2, 4, 8, 16, 24, 32, 48, 64))
VERIFY = Histogram("specmesh_target_verify_seconds", "the batched forward a round was verified in",
                   buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1, 2))
WAIT = Histogram("specmesh_target_wait_for_draft_seconds",
                 "from sending verified tokens to receiving the next subtree (draft re-root + channel)",
                 buckets=(0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1))
SESSIONS = Gauge("specmesh_target_sessions_active", "sessions on the target")
MAX_POSITIONS = 16


def record_round(accepted: int, tree_size: int, tokens: int, verify_s: float, wait_s: float | None,
                 ahead: bool = False) -> None:
    """One committed round; `ahead`: a plain round while the session's subtree was on its way."""
    speculative = tree_size > 1
    ROUNDS.labels("speculative" if speculative else "ahead" if ahead else "target_only").inc()
    TOKENS.inc(tokens)
    VERIFY.observe(verify_s)
    if not speculative:
        return
    NUM_DRAFTS.inc()
    NUM_DRAFT_TOKENS.inc(tree_size - 1)
    NUM_ACCEPTED.inc(accepted)
    TREE_SIZE.observe(tree_size)
    for pos in range(min(accepted, MAX_POSITIONS)):
        ACCEPTED_PER_POS.labels(str(pos)).inc()
    if wait_s is not None:
        WAIT.observe(wait_s)
STEP_ROWS = Histogram("specmesh_target_step_rows", "rows in one batched target forward (trees + prefill chunks)",
                      buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
STEPS = Counter("specmesh_target_steps", "batched forwards by the threads they ran on (own: --threads; "
                "borrowed: the draft's cores too, --borrow-threads)", ["threads"])
STEPS_OWN, STEPS_BORROWED = STEPS.labels("own"), STEPS.labels("borrowed")  # bound once: counted every step
STEP_SESSIONS = Histogram("specmesh_target_step_sessions", "sessions in one batched target forward",
                          buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32))
