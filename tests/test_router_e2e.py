"""End to end through the real mesh (treekv, target, draft, router as processes, tiny pair):
streaming with speculation, exact stop strings / stop ids, Abort, client cancellation and
deadlines freeing every KV block, the HTTP API, the SDK, the CLI, and the draft going away."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any, Iterator

import grpc
import pytest

from specmesh.clients import (AsyncClient, Client, DeadlineExceededError, InvalidArgumentError,
                              ResourceExhaustedError, SpecmeshClientError)
from specmesh.v1 import generation_pb2 as pb
from specmesh.v1 import generation_pb2_grpc as pb_grpc
from specmesh.v1 import mesh_pb2, mesh_pb2_grpc

from router_testing import DRAFT, FullMesh, kv_stats, serve_mesh, wait_kv_idle
from service_helpers import start_service

MAX_CONCURRENT = 4
LONG = 1800  # tokens: several seconds on the tiny pair, for requests that must still be running


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FullMesh]:
    yield from serve_mesh(tmp_path_factory.getbasetemp(), pool_blocks=1024,
                          router_args=["--max-concurrent", str(MAX_CONCURRENT)],
                          target_args=["--verify-delay-ms", "5"],  # rounds of a few ms, like a real target
                          # streams check the draft took part: none may start paused under a load
                          # the tiny draft's yield calls plain
                          draft_args=["--plain-pause-s", "0"])


@pytest.fixture(scope="module")
def tokenizer(mesh: FullMesh) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(mesh.target_dir, local_files_only=True)


@pytest.fixture
def client(mesh: FullMesh) -> Iterator[Client]:
    with Client(mesh.router.addr, timeout=60) as c:
        yield c


def test_stream_accounting_and_speculation(mesh: FullMesh, client: Client, tokenizer: Any) -> None:
    with grpc.insecure_channel(mesh.router.addr) as ch:
        responses = list(pb_grpc.GenerationStub(ch).Generate(
            pb.GenerateRequest(prompt="The quick brown fox", max_tokens=48, ignore_eos=True), timeout=60))
    chunks = [r.chunk for r in responses[:-1]]
    final = responses[-1].final
    assert all(r.HasField("chunk") for r in responses[:-1]) and responses[-1].HasField("final")
    ids = [t for c in chunks for t in c.token_ids]
    assert final.finish_reason == pb.FINISH_REASON_LENGTH
    assert final.usage.completion_tokens == len(ids) == 48
    assert final.usage.prompt_tokens == len(tokenizer.encode("The quick brown fox"))
    assert final.usage.rounds == sum(1 for c in chunks if c.token_ids)
    assert final.usage.mean_accepted_tokens == pytest.approx(48 / final.usage.rounds)
    assert "".join(c.text for c in chunks) == tokenizer.decode(ids, skip_special_tokens=True)
    assert any(c.accepted > 0 for c in chunks), "the draft never got a token accepted"
    assert max(len(c.token_ids) for c in chunks) > 1
    wait_kv_idle(mesh.treekv.addr)


def test_model_info_shows_the_speculation_shape(mesh: FullMesh, client: Client) -> None:
    """ModelInfo (SDK, HTTP, CLI) shows the tree the router asks for and the draft planner's choice."""
    before = client.model_info().speculation
    assert before is not None and before.planner is not None and before.planner.active
    done = client.complete("Tell me about the shape of trees", max_tokens=48, ignore_eos=True)
    assert done.usage.rounds > 1
    shape = client.model_info().speculation
    assert (shape.tree_width, shape.max_subtree_size) == (4, 16) and shape.depth >= 1
    p = shape.planner
    assert p is not None and p.active and len(p.verify_ms_by_rows) == 32
    assert list(p.verify_ms_by_rows) == sorted(p.verify_ms_by_rows)  # more rows never cost less
    # every greedy round after the first is planned (the last one's verified tokens end the session)
    n, size, tokens, ms = p.means_since(before.planner)
    assert 1 <= n <= done.usage.rounds - 1
    assert 1.0 <= size <= shape.max_subtree_size and 1.0 <= p.subtree_size <= shape.max_subtree_size
    assert 1.0 <= tokens <= size and 1.0 <= p.tokens_per_round <= shape.max_subtree_size  # <= one per node
    assert ms > 0 and p.round_ms > 0
    with urllib.request.urlopen(mesh.http + "/v1/models", timeout=30) as resp:
        entry = json.loads(resp.read())["data"][0]["specmesh"]
    assert entry["draft_connected"] and entry["speculation"]["max_subtree_size"] == 16
    assert entry["speculation"]["planner"]["active"] and entry["speculation"]["planner"]["rounds"] >= p.rounds
    cli = [sys.executable, "-m", "specmesh.clients.cli", "info", "--addr", mesh.router.addr]
    proc = subprocess.run(cli, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "tree     width 4, depth" in proc.stdout and "planner  now" in proc.stdout, proc.stdout
    assert "verify   target ms by rows: 1: " in proc.stdout
    out = json.loads(subprocess.run([*cli, "--json"], capture_output=True, text=True, timeout=60).stdout)
    assert out["speculation"]["planner"]["rounds"] >= p.rounds
    wait_kv_idle(mesh.treekv.addr)


def _baseline(client: Client, prompt: str, n: int = 64) -> Any:
    return client.complete(prompt, max_tokens=n, ignore_eos=True)


def test_stop_string_ends_text_and_tokens_exactly(client: Client, tokenizer: Any) -> None:
    base = _baseline(client, "stop strings")
    text = base.text
    # A stop string from the middle, first occurring there, made of complete characters.
    k = next(k for k in range(8, len(text) - 3) if "\ufffd" not in text[k:k + 3] and text.find(text[k:k + 3]) == k)
    stop = text[k:k + 3]
    done = client.complete("stop strings", max_tokens=64, ignore_eos=True, stop=[stop, "\x00never\x00"])
    assert done.finish_reason == "stop"
    assert done.text == text[:k]
    ids = list(done.token_ids)
    assert ids == list(base.token_ids[:len(ids)])
    # The last token sent is the one that completed the stop string.
    assert stop in tokenizer.decode(ids) and stop not in tokenizer.decode(ids[:-1])
    assert done.usage.completion_tokens == len(ids)


def test_early_ends_never_race_the_next_session(mesh: FullMesh, client: Client) -> None:
    """Stop strings end sessions while the target is still generating; the next session gets the
    same KV blocks from treekv at once. The router frees them in treekv only after the target
    confirmed the end, so no session may fail on blocks still in use."""
    base = _baseline(client, "race")
    stop = base.text[4:6]
    for _ in range(12):
        done = client.complete("race", max_tokens=LONG, ignore_eos=True, stop=stop)
        assert done.finish_reason == "stop" and len(done.token_ids) < 64
    wait_kv_idle(mesh.treekv.addr)


def test_stop_token_id(client: Client) -> None:
    base = _baseline(client, "stop ids")
    j = 10
    tok = base.token_ids[j]
    j = base.token_ids.index(tok)
    done = client.complete("stop ids", max_tokens=64, ignore_eos=True, stop_token_ids=[tok])
    assert done.finish_reason == "stop"
    assert done.token_ids == base.token_ids[:j + 1]


def test_abort_ends_stream_with_abort_and_frees_kv(mesh: FullMesh, client: Client) -> None:
    stream = client.generate("abort me", max_tokens=LONG, ignore_eos=True, request_id="to-abort")
    first = next(stream)
    assert not first.is_final
    # The committed tokens reach treekv's log in the background, in order. The session id is the
    # router's own (unique per attempt), not the request id: this is the only live session.
    (session,) = kv_stats(mesh.treekv.addr).sessions
    deadline = time.monotonic() + 5
    while True:
        with grpc.insecure_channel(mesh.treekv.addr) as ch:
            log = mesh_pb2_grpc.TreeKVStub(ch).GetCommitted(mesh_pb2.SessionRef(session_id=session.session_id),
                                                            timeout=5)
        if len(log.committed_ids) >= len(first.token_ids) or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert list(log.committed_ids[:len(first.token_ids)]) == list(first.token_ids)
    assert len(log.prompt_ids) > 0
    with pytest.raises(InvalidArgumentError, match="request_id 'to-abort' is already running"):
        client.complete("again", max_tokens=4, request_id="to-abort")
    assert client.abort("to-abort") is True
    rest = list(stream)
    got = [*first.token_ids, *(t for c in rest for t in c.token_ids)]
    assert rest[-1].finish_reason == "abort" and rest[-1].request_id == "to-abort"
    assert rest[-1].usage.completion_tokens == len(got)
    assert list(log.committed_ids) == got[:len(log.committed_ids)]
    assert rest[-1].usage.completion_tokens < LONG
    assert client.abort("to-abort") is False
    wait_kv_idle(mesh.treekv.addr)


def test_client_cancel_and_deadline_free_kv(mesh: FullMesh, client: Client) -> None:
    stream = client.generate("cancel me", max_tokens=LONG, ignore_eos=True)
    next(stream)
    stream.close()  # leaving the loop cancels the call
    wait_kv_idle(mesh.treekv.addr)
    with Client(mesh.router.addr, timeout=0.5) as hasty:
        t0 = time.monotonic()
        with pytest.raises(DeadlineExceededError):
            hasty.complete("deadline", max_tokens=LONG, ignore_eos=True)
        assert time.monotonic() - t0 < 3
    wait_kv_idle(mesh.treekv.addr)


def test_async_client_concurrent_requests(mesh: FullMesh) -> None:
    async def main() -> list[Any]:
        async with AsyncClient(mesh.router.addr, timeout=60) as ac:
            info = await ac.model_info()
            assert info.draft_connected and info.vocab_size == 260
            return await asyncio.gather(*[ac.complete(f"prompt {i}", max_tokens=24, ignore_eos=True, seed=i)
                                          for i in range(4)])

    results = asyncio.run(main())
    assert [(r.finish_reason, len(r.token_ids)) for r in results] == [("length", 24)] * 4
    wait_kv_idle(mesh.treekv.addr)


def test_admission_limit(mesh: FullMesh, client: Client) -> None:
    streams = [client.generate(f"busy {i}", max_tokens=LONG, ignore_eos=True) for i in range(MAX_CONCURRENT)]
    for stream in streams:
        next(stream)  # all running
    with pytest.raises(ResourceExhaustedError, match=f"limit of {MAX_CONCURRENT} concurrent requests"):
        client.complete("one too many", max_tokens=4)
    req = urllib.request.Request(mesh.http + "/v1/completions", data=b'{"prompt": "x", "max_tokens": 2}')
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=10)
    assert info.value.code == 429
    for stream in streams:
        stream.close()
    wait_kv_idle(mesh.treekv.addr)
    assert client.complete("room again", max_tokens=4, ignore_eos=True).finish_reason == "length"


def _post(mesh: FullMesh, path: str, body: dict[str, Any]) -> bytes:
    req = urllib.request.Request(mesh.http + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        assert resp.status == 200
        return resp.read()


def test_http_stream_and_non_stream_agree(mesh: FullMesh) -> None:
    body = {"model": "target", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20,
            "temperature": 0, "ignore_eos": True}
    full = json.loads(_post(mesh, "/v1/chat/completions", body))
    assert full["object"] == "chat.completion" and full["model"] == "target"
    assert full["choices"][0]["finish_reason"] == "length" and full["usage"]["completion_tokens"] == 20
    assert full["usage"]["prompt_tokens_details"]["cached_tokens"] >= 0  # OpenAI's shape (test_router_pairs: > 0)
    raw = _post(mesh, "/v1/chat/completions", {**body, "stream": True}).decode()
    events = [line[len("data: "):] for line in raw.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert streamed == full["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and chunks[-1]["usage"]["completion_tokens"] == 20
    assert chunks[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] >= 0
    raw = _post(mesh, "/v1/chat/completions", {**body, "stream": True,
                                               "stream_options": {"include_usage": False}}).decode()
    last = json.loads([line for line in raw.split("\n\n") if line.startswith("data: {")][-1][len("data: "):])
    assert last["choices"][0]["finish_reason"] == "length" and "usage" not in last
    comp = json.loads(_post(mesh, "/v1/completions", {"prompt": "abc", "max_tokens": 7, "temperature": 0,
                                                      "ignore_eos": True}))
    assert comp["object"] == "text_completion" and comp["usage"]["completion_tokens"] == 7
    wait_kv_idle(mesh.treekv.addr)


def test_http_client_hangup_frees_kv(mesh: FullMesh) -> None:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", mesh.router.ready["http_port"], timeout=30)
    conn.request("POST", "/v1/completions", json.dumps({"prompt": "hang up", "max_tokens": LONG, "stream": True,
                                                        "ignore_eos": True}), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Type", "").startswith("text/event-stream")
    assert resp.readline().startswith(b"data: ")
    conn.sock.close()  # the client goes away mid-stream
    conn.close()
    wait_kv_idle(mesh.treekv.addr)
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(mesh.http + "/v1/nothing", timeout=10)
    assert info.value.code == 404 and json.loads(info.value.read())["error"]["code"] == "not_found"


def test_cli_generate(mesh: FullMesh) -> None:
    cli = [sys.executable, "-m", "specmesh.clients.cli", "generate"]
    proc = subprocess.run([*cli, "hello", "--addr", mesh.router.addr, "--max-tokens", "12", "--ignore-eos"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "[length] 12 tokens in" in proc.stderr and "tokens per target round" in proc.stderr
    proc = subprocess.run([*cli, "hello", "--addr", mesh.router.addr, "--max-tokens", "5", "--ignore-eos", "--json",
                           "--raw"], capture_output=True, text=True, timeout=60)
    out = json.loads(proc.stdout)
    assert proc.returncode == 0 and out["finish_reason"] == "length" and len(out["token_ids"]) == 5


def _with_logs(mesh: FullMesh, fn: Any) -> Any:
    try:
        return fn()
    except SpecmeshClientError as exc:
        logs = "\n".join(f"--- {name}:\n{mesh.procs[name].log_tail(3000)}" for name in ("router", "target", "draft")
                         if name in mesh.procs)
        raise AssertionError(f"{exc.code.name}: {exc}\n{logs}") from None


def test_draft_down_then_restarted(mesh: FullMesh, client: Client) -> None:
    """Last in this module: it stops the draft, then starts a new one on the same port."""
    port = mesh.draft.port
    mesh.draft.stop()
    deadline = time.monotonic() + 15
    while client.model_info().draft_connected:
        assert time.monotonic() < deadline, "the router still reports the draft connected"
        time.sleep(0.2)
    assert client.model_info().speculation.planner is None  # the draft does not answer
    done = _with_logs(mesh, lambda: client.complete("no draft", max_tokens=16, ignore_eos=True))
    assert done.finish_reason == "length" and len(done.token_ids) == 16
    assert done.usage.rounds == 16  # one token per target forward
    wait_kv_idle(mesh.treekv.addr)
    # A new draft process (new instance id) at the same address: the router pairs it again. It
    # runs --no-plan: 32 tokens are too few for a fresh planner's calibration to be sure to speculate.
    mesh.procs["draft"] = start_service(DRAFT, ["--model", str(mesh.draft_dir), "--port", str(port),
                                                "--pool-blocks", "1024", "--block-size", "16", "--threads", "1",
                                                "--no-plan"])
    mesh.wait_paired(timeout=30)
    done = _with_logs(mesh, lambda: client.complete("draft is back", max_tokens=32, ignore_eos=True))
    assert done.finish_reason == "length" and done.usage.rounds < 32  # speculation again
    wait_kv_idle(mesh.treekv.addr)
