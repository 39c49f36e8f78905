"""The mesh locked down: mutual TLS between services, the shared secret on internal calls, API keys
on the public gRPC and HTTP endpoints, Abort limited to the key that sent the request, and the
target's tensor-channel rendezvous listening on loopback only. Real processes, real certificates
(made here with `cryptography`), real TLS channels.
"""
from __future__ import annotations

import datetime
import ipaddress
import json
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from specmesh.v1 import generation_pb2 as pb
from specmesh.v1 import generation_pb2_grpc as pb_grpc
from specmesh.v1 import mesh_pb2, mesh_pb2_grpc

from router_testing import ROUTER, FullMesh
from service_helpers import start_service

SECRET = "mesh-secret-0123456789"
KEYS = ("key-alice", "key-bob")


class Pki:
    """A CA and certificates it signs for 127.0.0.1 / localhost, written as PEM files under base."""

    def __init__(self, base: Path, name: str = "specmesh-test-ca") -> None:
        self.base = base
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.cert = (self._builder(subject, subject, self.key.public_key())
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .sign(self.key, hashes.SHA256()))
        self.ca_path = self._write(f"{name}.pem", self.cert.public_bytes(serialization.Encoding.PEM))

    @staticmethod
    def _builder(subject: x509.Name, issuer: x509.Name, public_key: Any) -> x509.CertificateBuilder:
        now = datetime.datetime.now(datetime.timezone.utc)
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
                .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=1)))

    def _write(self, name: str, data: bytes) -> str:
        path = self.base / name
        path.write_bytes(data)
        return str(path)

    def issue(self, name: str) -> tuple[str, str]:
        """(cert path, key path) of a server-and-client certificate for 127.0.0.1 and localhost."""
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        cert = (self._builder(subject, self.cert.subject, key.public_key())
                .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                            x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                               critical=False)
                .sign(self.key, hashes.SHA256()))
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return (self._write(f"{name}.crt", cert.public_bytes(serialization.Encoding.PEM)),
                self._write(f"{name}.key", key_pem))


class Secured:
    def __init__(self, mesh: FullMesh, pki: Pki, client: tuple[str, str], outsider: tuple[str, str]) -> None:
        self.mesh, self.pki, self.client, self.outsider = mesh, pki, client, outsider
        self.ca = Path(pki.ca_path).read_bytes()

    def channel(self, addr: str, cert: tuple[str, str] | None = None) -> grpc.Channel:
        """A TLS channel trusting the test CA, presenting `cert` (mutual TLS) if given."""
        key = chain = None
        if cert is not None:
            chain, key = Path(cert[0]).read_bytes(), Path(cert[1]).read_bytes()
        return grpc.secure_channel(addr, grpc.ssl_channel_credentials(self.ca, key, chain))

    def router(self) -> pb_grpc.GenerationStub:
        return pb_grpc.GenerationStub(self.channel(self.mesh.router.addr))

    def http(self, path: str, body: Any = None, key: str | None = None) -> tuple[int, dict[str, Any]]:
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        req = urllib.request.Request(f"https://127.0.0.1:{self.mesh.router.ready['http_port']}{path}",
                                     data=json.dumps(body).encode() if body is not None else None, headers=headers)
        ctx = ssl.create_default_context(cafile=self.pki.ca_path)
        try:
            with urllib.request.urlopen(req, timeout=30, context=ctx) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())


def _key(k: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {k}"),)


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    base = tmp_path_factory.mktemp("pki")
    pki = Pki(base)
    cert, key = pki.issue("mesh")
    client = pki.issue("client")
    outsider = Pki(base, "other-ca").issue("outsider")
    (base / "keys").write_text("# API keys\n" + "\n".join(KEYS) + "\n")
    env = {"SPECMESH_INTERNAL_SECRET": SECRET, "SPECMESH_TLS_CERT": cert, "SPECMESH_TLS_KEY": key,
           "SPECMESH_TLS_CA": pki.ca_path}
    mesh = FullMesh(tmp_path_factory.getbasetemp(), pool_blocks=64, env=env,
                    router_args=["--api-key-file", str(base / "keys")])
    s = Secured(mesh, pki, client, outsider)
    try:
        stub = s.router()
        deadline = time.monotonic() + 60
        while not stub.ModelInfo(pb.ModelInfoRequest(), timeout=5, metadata=_key(KEYS[0])).draft_connected:
            assert time.monotonic() < deadline, f"not paired; router log:\n{mesh.router.log_tail()}"
            time.sleep(0.1)
        yield s
    finally:
        mesh.stop()


def test_generation_through_tls_secret_and_api_key(secured: Secured) -> None:
    stub = secured.router()
    replies = list(stub.Generate(pb.GenerateRequest(prompt="hello world", max_tokens=12, ignore_eos=True),
                                 timeout=60, metadata=_key(KEYS[0])))
    final = replies[-1].final
    assert final.finish_reason == pb.FINISH_REASON_LENGTH and final.usage.completion_tokens == 12
    assert final.usage.rounds < 12  # the draft speculated over the (secret-carrying, TLS) mesh
    status, body = secured.http("/v1/completions", {"prompt": "hello", "max_tokens": 3, "ignore_eos": True},
                                key=KEYS[1])
    assert status == 200 and body["usage"]["completion_tokens"] == 3
    wait_kv_idle_tls(secured)


def wait_kv_idle_tls(secured: Secured) -> None:
    """Until treekv holds no session (the plaintext wait_kv_idle cannot reach this mesh)."""
    stub = mesh_pb2_grpc.TreeKVStub(secured.channel(secured.mesh.treekv.addr, secured.client))
    deadline = time.monotonic() + 5
    while (stats := stub.Stats(mesh_pb2.Empty(), timeout=5, metadata=((("x-specmesh-secret", SECRET),)))).sessions:
        assert time.monotonic() < deadline, stats
        time.sleep(0.05)


def test_public_endpoints_require_an_api_key(secured: Secured) -> None:
    stub = secured.router()
    for metadata in ((), _key("wrong"), (("authorization", KEYS[0]),)):  # none, unknown, not "Bearer"
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(pb.GenerateRequest(prompt="hi", max_tokens=2), timeout=10, metadata=metadata))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "API key" in info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            stub.Abort(pb.AbortRequest(request_id="x"), timeout=10, metadata=metadata)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    for key in (None, "wrong"):
        status, body = secured.http("/v1/completions", {"prompt": "hi", "max_tokens": 2}, key=key)
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
        status, body = secured.http("/v1/models", key=key)
        assert status == 401
    status, body = secured.http("/health")  # probes need no key
    assert status == 200
    health = health_pb2_grpc.HealthStub(secured.channel(secured.mesh.router.addr))
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING


def test_plaintext_is_refused_on_every_port(secured: Secured) -> None:
    for proc in (secured.mesh.router, secured.mesh.treekv, secured.mesh.draft, secured.mesh.target):
        with grpc.insecure_channel(proc.addr) as ch:
            with pytest.raises(grpc.RpcError) as info:
                health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE, proc.module


def test_internal_services_require_a_client_certificate_and_the_secret(secured: Secured) -> None:
    treekv = secured.mesh.treekv.addr
    for cert in (None, secured.outsider):  # no client certificate; one from another CA: no handshake
        with secured.channel(treekv, cert) as ch:
            with pytest.raises(grpc.RpcError) as info:
                mesh_pb2_grpc.TreeKVStub(ch).Stats(mesh_pb2.Empty(), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    with secured.channel(treekv, secured.client) as ch:  # the mesh's CA, but no secret
        stub = mesh_pb2_grpc.TreeKVStub(ch)
        for metadata in ((), (("x-specmesh-secret", "guess"),)):
            for call in (lambda: stub.Stats(mesh_pb2.Empty(), timeout=5, metadata=metadata),
                         lambda: stub.CloseSession(mesh_pb2.SessionRef(session_id="x"), timeout=5,
                                                   metadata=metadata)):
                with pytest.raises(grpc.RpcError) as info:
                    call()
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert "x-specmesh-secret" in info.value.details()
        health = health_pb2_grpc.HealthStub(ch)  # health stays open for probes
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
            health_pb2.HealthCheckResponse.SERVING
        assert stub.Stats(mesh_pb2.Empty(), timeout=5, metadata=(("x-specmesh-secret", SECRET),)) is not None
    for proc, stub_cls, method, request in ((secured.mesh.target, mesh_pb2_grpc.TargetStub, "Info", mesh_pb2.Empty()),
                                            (secured.mesh.draft, mesh_pb2_grpc.DraftStub, "Info", mesh_pb2.Empty())):
        with secured.channel(proc.addr, secured.client) as ch:
            with pytest.raises(grpc.RpcError) as info:
                getattr(stub_cls(ch), method)(request, timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_abort_of_another_keys_request_is_refused(secured: Secured) -> None:
    stub = secured.router()
    started = threading.Event()
    result: dict[str, Any] = {}

    def run() -> None:
        stream = stub.Generate(pb.GenerateRequest(prompt="hello", max_tokens=200, ignore_eos=True,
                                                  request_id="alice-1"), timeout=60, metadata=_key(KEYS[0]))
        for reply in stream:
            started.set()
            if reply.HasField("final"):
                result["final"] = reply.final

    thread = threading.Thread(target=run)
    thread.start()
    try:
        assert started.wait(30)
        with pytest.raises(grpc.RpcError) as info:
            stub.Abort(pb.AbortRequest(request_id="alice-1"), timeout=10, metadata=_key(KEYS[1]))
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "another API key" in info.value.details()
        assert stub.Abort(pb.AbortRequest(request_id="alice-1"), timeout=10, metadata=_key(KEYS[0])).found
    finally:
        thread.join(60)
    assert result["final"].finish_reason == pb.FINISH_REASON_ABORT
    wait_kv_idle_tls(secured)


def test_tensor_channel_rendezvous_listens_on_loopback_only(secured: Secured) -> None:
    port = secured.mesh.target.ready["tensor_port"]
    listening = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True, check=True).stdout.splitlines()
    local = [line.split()[3] for line in listening if line.split()[3].rsplit(":", 1)[1] == str(port)]
    assert local == [f"127.0.0.1:{port}"], listening


def test_router_with_a_wrong_secret_names_the_refusing_service(secured: Secured, tmp_path: Path) -> None:
    mesh = secured.mesh
    env = {"SPECMESH_INTERNAL_SECRET": "not-the-secret", "SPECMESH_TLS_CERT": secured.client[0],
           "SPECMESH_TLS_KEY": secured.client[1], "SPECMESH_TLS_CA": secured.pki.ca_path}
    with start_service(ROUTER, ["--model", str(mesh.target_dir), "--http-port", "-1", "--draft-addr", "",
                                "--treekv-addr", mesh.treekv.addr, "--target-addr", mesh.target.addr],
                       env=env) as router:
        with secured.channel(router.addr) as ch:
            with pytest.raises(grpc.RpcError) as info:
                list(pb_grpc.GenerationStub(ch).Generate(pb.GenerateRequest(prompt="hi", max_tokens=2), timeout=10))
    assert info.value.code() == grpc.StatusCode.INTERNAL
    # The first call is the pairing poll's Info of the target (the request is then told why no pair can take it).
    assert f"target-service at {mesh.target.addr} refused the router" in info.value.details()
    assert "x-specmesh-secret" in info.value.details()



def test_sdk_and_cli_carry_the_api_key_over_tls(secured: Secured) -> None:
    import os
    import sys

    from specmesh.clients.sdk import Client, SpecmeshClientError

    addr, ca = secured.mesh.router.addr, secured.pki.ca_path
    with Client(addr, timeout=60, api_key=KEYS[1], tls_ca=ca) as client:
        done = client.complete("hello", max_tokens=4, ignore_eos=True)
        assert done.usage.completion_tokens == 4
    with Client(addr, timeout=60, api_key="wrong", tls_ca=ca) as client:
        with pytest.raises(SpecmeshClientError) as info:
            client.complete("hello", max_tokens=4)
        assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
    env = {**os.environ, "SPECMESH_API_KEY": KEYS[0]}
    proc = subprocess.run([sys.executable, "-m", "specmesh.clients.cli", "generate", "hello", "--raw", "--addr", addr,
                           "--tls-ca", ca, "--max-tokens", "3", "--ignore-eos", "--json"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["usage"]["completion_tokens"] == 3
