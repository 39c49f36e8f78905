"""The client SDK and the `specmesh generate` command: request building, and errors mapped to
SpecmeshClientError subclasses (one line, no traceback) against a real router whose target is
down. Successful generation through the SDK is covered in test_router_e2e.py."""
from __future__ import annotations

import asyncio
import subprocess
import sys
from typing import Iterator

import grpc
import pytest

from specmesh.clients import (AsyncClient, Client, InvalidArgumentError, SpecmeshClientError, UnavailableError)
from specmesh.clients.sdk import build_request

from router_testing import ROUTER, TREEKV, closed_port, tiny_pair
from service_helpers import ServiceProcess, start_service


def test_build_request() -> None:
    req = build_request("hi", max_tokens=7, temperature=0.5, top_p=0.9, top_k=3, seed=11, stop="\n",
                        stop_token_ids=[5], ignore_eos=True, request_id="r")
    assert req.WhichOneof("input") == "prompt" and req.prompt == "hi"
    assert (req.max_tokens, req.sampling.top_k, req.sampling.seed, list(req.stop), list(req.stop_token_ids)) == \
        (7, 3, 11, ["\n"], [5])
    assert req.ignore_eos and req.request_id == "r"
    assert not build_request("x").sampling.HasField("seed")
    chat = build_request(messages=[{"role": "system", "content": "s"}, ("user", "u")])
    assert [(m.role, m.content) for m in chat.messages.messages] == [("system", "s"), ("user", "u")]
    assert build_request(token_ids=[]).WhichOneof("input") == "token_ids"  # given but empty: the router says so
    with pytest.raises(InvalidArgumentError, match="set only one of prompt, messages or token_ids"):
        build_request("x", token_ids=[1])


@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServiceProcess, int]]:
    target_dir, _ = tiny_pair(tmp_path_factory.getbasetemp())
    target_port = closed_port()
    with start_service(TREEKV, []) as treekv:
        with start_service(ROUTER, ["--model", str(target_dir), "--http-port", "-1", "--draft-addr", "",
                                    "--treekv-addr", treekv.addr, "--target-addr", f"127.0.0.1:{target_port}"]) as r:
            yield r, target_port


def test_errors_carry_code_and_message(router: tuple[ServiceProcess, int]) -> None:
    proc, target_port = router
    with Client(proc.addr, timeout=10) as client:
        with pytest.raises(InvalidArgumentError) as info:
            list(client.generate("", max_tokens=4))
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and info.value.message == "prompt is empty"
        with pytest.raises(InvalidArgumentError, match="max_tokens must be > 0"):
            client.complete("x", max_tokens=0)
        with pytest.raises(UnavailableError, match=f"target-service at 127.0.0.1:{target_port} is unavailable"):
            client.complete("x", max_tokens=4)
        info_ = client.model_info()
        assert info_.vocab_size == 260 and info_.eos_token_ids == (258,) and not info_.draft_connected
        assert info_.draft_model == ""  # no draft configured
        assert client.abort("unknown") is False


def test_async_client_errors(router: tuple[ServiceProcess, int]) -> None:
    proc, target_port = router

    async def main() -> None:
        async with AsyncClient(proc.addr, timeout=10) as client:
            with pytest.raises(InvalidArgumentError, match="messages is empty"):
                await client.complete(messages=[], max_tokens=4)
            with pytest.raises(UnavailableError, match="target-service"):
                async for _ in client.generate("x", max_tokens=4):
                    pass
            assert (await client.model_info()).context_length == 2048
            assert await client.abort("unknown") is False

    asyncio.run(main())


def test_router_down_names_the_router() -> None:
    addr = f"127.0.0.1:{closed_port()}"
    with Client(addr, timeout=5) as client:
        with pytest.raises(UnavailableError, match=f"router at {addr} is unavailable") as info:
            client.complete("x", max_tokens=1)
        assert isinstance(info.value, SpecmeshClientError) and info.value.code == grpc.StatusCode.UNAVAILABLE


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "specmesh.clients.cli", "generate", *args], capture_output=True,
                          text=True, timeout=60)


def test_cli_errors_are_one_line_and_exit_2(router: tuple[ServiceProcess, int]) -> None:
    proc, target_port = router
    cases = [
        (["hi", "--addr", proc.addr, "--max-tokens", "0"], "error: max_tokens must be > 0, got 0"),
        (["hi", "--addr", proc.addr, "--temperature", "-1"], "error: temperature must be >= 0, got -1.0"),
        (["hi", "--addr", proc.addr], f"error: target-service at 127.0.0.1:{target_port} is unavailable"),
        (["hi", "--addr", proc.addr, "--raw", "--system", "s"], "error: --system needs the chat template"),
    ]
    for args, expected in cases:
        result = _cli(*args)
        assert result.returncode == 2, result
        assert result.stderr.startswith(expected) and result.stderr.count("\n") == 1, result.stderr
        assert result.stdout == ""
    down = f"127.0.0.1:{closed_port()}"
    result = _cli("hi", "--addr", down)
    assert result.returncode == 2 and result.stderr.startswith(f"error: router at {down} is unavailable")
