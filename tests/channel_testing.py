"""A tensor channel on loopback whose draft end a test holds (gloo; the test plays the draft)."""
from __future__ import annotations

import threading

from specmesh.services.runtime.channel import DRAFT_RANK, TARGET_RANK, TensorChannel, host_store, join_store


def channel_pair(vocab: int, capacity: int = 64) -> tuple[TensorChannel, TensorChannel]:
    """(target end, draft end) of one freshly rendezvoused channel."""
    store = host_store("127.0.0.1", 0)
    joined: list[TensorChannel] = []
    joiner = threading.Thread(target=lambda: joined.append(
        TensorChannel(join_store("127.0.0.1", store.port), "t", DRAFT_RANK, capacity, vocab)))
    joiner.start()
    target_end = TensorChannel(store, "t", TARGET_RANK, capacity, vocab)
    joiner.join(60)
    return target_end, joined[0]
