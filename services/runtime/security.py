"""Credentials of the mesh: the shared secret internal calls carry, and TLS certificates.

Every service reads the same flags (CommonConfig): --internal-secret-file (or the secret itself in
SPECMESH_INTERNAL_SECRET), and --tls-cert / --tls-key / --tls-ca. With a CA, a service's gRPC
port demands a client certificate signed by it (mutual TLS between services), and the router
verifies the services' certificates with it and presents its own. The router's public port and
HTTP use the same certificate but ask no client certificate (clients authenticate by API key).
"""
from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from .errors import SpecmeshError

SECRET_ENV = "SPECMESH_INTERNAL_SECRET"
API_KEY_ENV = "SPECMESH_API_KEY"


class CredentialsError(SpecmeshError, ValueError):
    """A secret, key or certificate file that cannot be used (reported in one line at start-up)."""

    grpc_code_name = "FAILED_PRECONDITION"


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise CredentialsError(f"cannot read the {what} {path}: {exc.strerror or exc}") from None


def read_secret(path: str, env: str) -> str:
    """The secret in `path` (stripped), else in the environment variable `env`, else ''."""
    if path:
        secret = _read(path, "secret file").decode().strip()
        if not secret:
            raise CredentialsError(f"the secret file {path} is empty")
        return secret
    return os.environ.get(env, "").strip()


def read_api_keys(path: str) -> frozenset[str]:
    """API keys, one per line in `path` (blank lines and # comments skipped), else SPECMESH_API_KEY."""
    if not path:
        key = os.environ.get(API_KEY_ENV, "").strip()
        return frozenset([key] if key else [])
    keys = [line.strip() for line in _read(path, "API key file").decode().splitlines()]
    keys = [k for k in keys if k and not k.startswith("#")]
    if not keys:
        raise CredentialsError(f"the API key file {path} holds no key")
    return frozenset(keys)


@dataclass(frozen=True)
class MeshSecurity:
    """What one service presents and demands inside the mesh."""

    secret: str = ""
    cert: bytes | None = None
    key: bytes | None = None
    ca: bytes | None = None

    @classmethod
    def from_config(cls, config: Any) -> "MeshSecurity":
        """From a CommonConfig's flags; CredentialsError naming the flag when they do not fit together."""
        if bool(config.tls_cert) != bool(config.tls_key):
            raise CredentialsError("--tls-cert and --tls-key go together")
        if config.tls_ca and not config.tls_cert:
            raise CredentialsError("--tls-ca needs --tls-cert and --tls-key (mutual TLS: every service has a certificate)")
        return cls(secret=read_secret(config.internal_secret_file, SECRET_ENV),
                   cert=_read(config.tls_cert, "--tls-cert") if config.tls_cert else None,
                   key=_read(config.tls_key, "--tls-key") if config.tls_key else None,
                   ca=_read(config.tls_ca, "--tls-ca") if config.tls_ca else None)

    @property
    def tls(self) -> bool:
        return self.cert is not None

    def server_credentials(self, client_certificates: bool = True) -> grpc.ServerCredentials | None:
        """None without TLS; with a CA and client_certificates, clients must present a certificate it signed."""
        if self.cert is None or self.key is None:
            return None
        mutual = client_certificates and self.ca is not None
        return grpc.ssl_server_credentials([(self.key, self.cert)], root_certificates=self.ca if mutual else None,
                                           require_client_auth=mutual)

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        """For dialling another service: None (plaintext) unless a CA is set."""
        if self.ca is None:
            return None
        return grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.key,
                                            certificate_chain=self.cert)


def http_ssl_context(config: Any) -> ssl.SSLContext | None:
    """The server-side TLS context for an HTTP endpoint from --tls-cert / --tls-key (None without)."""
    if not config.tls_cert:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(config.tls_cert, config.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise CredentialsError(f"cannot load --tls-cert {config.tls_cert} with --tls-key {config.tls_key}: "
                               f"{exc}") from None
    return ctx
