"""The tensor channel between a draft and a target: torch.distributed point-to-point.

Two pair groups per pairing, one per direction, so each has exactly one sending thread and one
receiving thread (the target's worker sends verified tokens while its receiver waits for the
next subtree). Messages are fixed-shape preallocated tensors: a subtree is one int64 tensor
[header | tokens | parents], verified tokens are one int64 tensor [header | tokens], and draft
probabilities (only when sampling) follow a subtree as one float32 [n, vocab] tensor. Gloo on
CPU, NCCL when the models live on CUDA. The rendezvous is a TCPStore hosted by the target; the
router hands its address to the draft over gRPC, with a fresh `epoch` prefix for every pairing.

A subtree's header says where its root sits in the sequence (prompt + output), so a draft that
(re)joined a running session behind the target can be fitted to it; verified messages have room
for up to CATCH_UP_TOKENS committed tokens that such a draft has not seen, in front of a round's.
"""
from __future__ import annotations

import datetime
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

# subtree: kind, channel id, round, n, flags, has_q, trace id hi, trace id lo, span id (0 = untraced), root position
# verified: kind, channel id, round, n, flags, skipped, 0, 0, 0, 0
HEADER = 10
CATCH_UP_TOKENS = 256  # most committed tokens a verified message carries for a draft that is behind
KIND_SUBTREE, KIND_VERIFIED = 1, 2
FLAG_END = 1  # verified: the session is over, free it
FLAG_PREFILLED = 2  # verified (no tokens): the target prefilled the prompt, the draft may start its own
TARGET_RANK, DRAFT_RANK = 0, 1
FOREVER = datetime.timedelta(days=365)  # an idle pairing is normal; peer death surfaces as an error


@dataclass
class Subtree:
    channel_id: int  # the session's tag on this channel (the router's channel_slot)
    round: int
    tokens: list[int]
    parents: list[int]
    q: torch.Tensor | None
    trace: tuple[int, int, int] = (0, 0, 0)  # the draft's span for this round, linked from the target's
    position: int = 0  # the root token's index in prompt + output (the draft's prefix length)


@dataclass
class Verified:
    channel_id: int
    round: int
    tokens: list[int]
    end: bool
    skipped: int = 0  # leading tokens the target committed without this subtree (it came late)
    prefilled: bool = False  # no tokens: the target's prefill is done (DraftOpenRequest.after_target_prefill)


def host_store(host: str, port: int) -> dist.TCPStore:
    """The target's rendezvous store on host:port (port 0 = a free port; read it back from store.port).

    TCPStore itself listens on every interface; it gets a socket already bound to `host` instead,
    so the store is only reachable where the target advertises it (loopback by default).
    """
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    listener = socket.socket(family, kind, proto)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(addr)
        listener.listen(128)
        store = dist.TCPStore(host, listener.getsockname()[1], is_master=True, wait_for_workers=False,
                              timeout=datetime.timedelta(seconds=60), master_listen_fd=listener.fileno(),
                              use_libuv=True)
    except BaseException:
        listener.close()
        raise
    listener.detach()  # the store's server owns the descriptor now
    return store


def join_store(host: str, port: int) -> dist.TCPStore:
    return dist.TCPStore(host, port, is_master=False, timeout=datetime.timedelta(seconds=60), use_libuv=True)


def _pair_group(store: dist.Store, name: str, rank: int, backend: str, host: str) -> dist.ProcessGroup:
    prefixed = dist.PrefixStore(name, store)
    if backend == "nccl":
        return dist.ProcessGroupNCCL(prefixed, rank, 2)
    opts = dist.ProcessGroupGloo._Options()
    opts._timeout = FOREVER
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
    return dist.ProcessGroupGloo(prefixed, rank, 2, opts)


class TensorChannel:
    """One side of a draft<->target pairing. Construction blocks until the peer joins."""

    def __init__(self, store: dist.Store, epoch: str, rank: int, capacity: int, vocab: int,
                 backend: str = "gloo", device: str | torch.device = "cpu", host: str = "127.0.0.1") -> None:
        self.rank, self.peer = rank, 1 - rank
        self.capacity, self.vocab, self.device = capacity, vocab, torch.device(device)
        # Build both groups in the same order on both sides (each constructor rendezvouses).
        self.d2t = _pair_group(store, f"{epoch}/d2t", rank, backend, host)
        self.t2d = _pair_group(store, f"{epoch}/t2d", rank, backend, host)
        self._tree_buf = torch.zeros(HEADER + 2 * capacity, dtype=torch.long, device=self.device)
        self.verified_capacity = CATCH_UP_TOKENS + capacity + 1  # catch-up + accepted path + bonus
        self._verified_buf = torch.zeros(HEADER + self.verified_capacity, dtype=torch.long, device=self.device)
        self._q_buf: torch.Tensor | None = None  # allocated on the first sampled subtree

    def _q_buffer(self) -> torch.Tensor:
        if self._q_buf is None:
            self._q_buf = torch.zeros(self.capacity, self.vocab, dtype=torch.float32, device=self.device)
        return self._q_buf

    # -- draft side ----------------------------------------------------------------------------
    def send_subtree(self, channel_id: int, round_: int, tokens: list[int], parents: list[int],
                     q: torch.Tensor | None = None, trace: tuple[int, int, int] = (0, 0, 0), position: int = 0) -> None:
        n = len(tokens)
        buf = self._tree_buf
        buf[:HEADER + 2 * n] = torch.tensor([KIND_SUBTREE, channel_id, round_, n, 0, q is not None, *trace, position]
                                            + tokens + parents)
        self.d2t.send([buf], self.peer, 0).wait()
        if q is not None:
            qb = self._q_buffer()[:n]
            qb.copy_(q)
            self.d2t.send([qb], self.peer, 1).wait()

    def recv_verified(self) -> Verified:
        buf = self._verified_buf
        self.t2d.recv([buf], self.peer, 0).wait()
        head = buf[:HEADER].tolist()
        n = head[3]
        return Verified(head[1], head[2], buf[HEADER:HEADER + n].tolist(), bool(head[4] & FLAG_END), head[5],
                        bool(head[4] & FLAG_PREFILLED))

    # -- target side ---------------------------------------------------------------------------
    def recv_subtree(self) -> Subtree:
        buf = self._tree_buf
        self.d2t.recv([buf], self.peer, 0).wait()
        head = buf[:HEADER].tolist()
        n = head[3]
        body = buf[HEADER:HEADER + 2 * n].tolist()
        q = None
        if head[5]:
            q = self._q_buffer()[:n]
            self.d2t.recv([q], self.peer, 1).wait()
            q = q.clone()  # the buffer is reused by the next receive while this round verifies
        return Subtree(head[1], head[2], body[:n], body[n:], q, (head[6], head[7], head[8]), head[9])

    def send_verified(self, channel_id: int, round_: int, tokens: list[int], end: bool, skipped: int = 0) -> None:
        self._send_verified(channel_id, round_, tokens, FLAG_END if end else 0, skipped)

    def send_prefilled(self, channel_id: int) -> None:
        """Tell the draft the target's prefill of this session is done."""
        self._send_verified(channel_id, 0, [], FLAG_PREFILLED, 0)

    def _send_verified(self, channel_id: int, round_: int, tokens: list[int], flags: int, skipped: int) -> None:
        n = len(tokens)
        buf = self._verified_buf
        buf[:HEADER + n] = torch.tensor([KIND_VERIFIED, channel_id, round_, n, flags, skipped, 0, 0, 0, 0] + tokens)
        self.t2d.send([buf], self.peer, 0).wait()

    def close(self) -> None:
        for group in (self.d2t, self.t2d):
            try:
                group.abort() if hasattr(group, "abort") else None
            except Exception:  # best effort: the peer may already be gone
                pass
