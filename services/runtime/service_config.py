"""Typed service configuration from flags, each flag also read from SPECMESH_<FLAG> in the environment.

Each service declares one dataclass; its fields become flags (`tree_width` -> `--tree-width`,
env `SPECMESH_TREE_WIDTH`). Precedence: command line > environment > dataclass default.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import typing
from typing import Any, TypeVar

T = TypeVar("T")


@dataclasses.dataclass
class CommonConfig:
    """Flags every service has."""

    host: str = dataclasses.field(default="127.0.0.1", metadata={"help": "bind address (loopback by default; "
                                                                            "0.0.0.0 listens on all interfaces)"})
    port: int = dataclasses.field(default=0, metadata={"help": "gRPC port (0 = a free port)"})
    metrics_port: int = dataclasses.field(default=-1, metadata={"help": "Prometheus /metrics port (-1 = off, 0 = free)"})
    log_level: str = dataclasses.field(default="INFO", metadata={"help": "DEBUG, INFO, WARNING, ERROR"})
    ready_file: str = dataclasses.field(default="", metadata={"help": "write the bound port here once serving "
                                                                       "(used by `specmesh up`)"})
    internal_secret_file: str = dataclasses.field(default="", metadata={"help": "file holding the mesh's shared "
                                                                                 "secret, which every internal gRPC "
                                                                                 "call must carry ('' = env "
                                                                                 "SPECMESH_INTERNAL_SECRET, else "
                                                                                 "none)"})
    tls_cert: str = dataclasses.field(default="", metadata={"help": "PEM certificate of this service (TLS on its "
                                                                     "ports; also its client certificate)"})
    tls_key: str = dataclasses.field(default="", metadata={"help": "PEM private key of --tls-cert"})
    tls_ca: str = dataclasses.field(default="", metadata={"help": "PEM CA of the mesh: internal ports then require "
                                                                   "client certificates it signed (mutual TLS) and "
                                                                   "the router verifies the services with it"})
    shutdown_grace_s: float = dataclasses.field(default=30.0, metadata={"help": "on SIGTERM/SIGINT: seconds "
                                                                                "in-flight sessions get to finish "
                                                                                "(new ones are refused meanwhile)"})


def env_name(field: str) -> str:
    return "SPECMESH_" + field.upper()


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        env = os.environ.get(env_name(f.name))
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "") + f" [env {env_name(f.name)}]"
        if kind is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=_parse(bool, env) if env is not None else default, help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, type=_converter(kind),
                                default=_parse(kind, env) if env is not None else default, help=help_text)


def from_namespace(cls: type[T], ns: argparse.Namespace) -> T:
    return cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)})  # type: ignore[arg-type]


def _converter(kind: Any) -> Any:
    return lambda text: _parse(kind, text)


def _parse(kind: Any, text: str) -> Any:
    if kind is bool:
        return text.strip().lower() in ("1", "true", "yes", "on")
    if kind in (int, float, str):
        return kind(text)
    raise TypeError(f"unsupported config field type {kind}")


def setup_logging(level: str, service: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format=f"%(asctime)s {service} %(levelname)s %(name)s: %(message)s")
