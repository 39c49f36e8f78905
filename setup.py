"""Maps the top-level folders into one `specmesh` namespace and builds the gRPC code from protos/.

The generated protobuf/gRPC modules are produced here, at build/install time (never committed):
protos/specmesh/v1/*.proto -> build/protos/specmesh/v1/*_pb2*.py, installed as `specmesh.v1`.
"""
from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
FOLDERS = {"services": "specmesh.services", "kernels": "specmesh.kernels", "clients": "specmesh.clients",
           "models": "specmesh.models"}
GEN_ROOT = os.path.join("build", "protos")


def generate_protos() -> None:
    from grpc_tools import protoc  # build requirement, pinned with grpcio

    protos = sorted(glob.glob(os.path.join(HERE, "protos", "specmesh", "v1", "*.proto")))
    out = os.path.join(HERE, GEN_ROOT)
    shutil.rmtree(os.path.join(out, "specmesh"), ignore_errors=True)  # no stale modules of deleted protos
    os.makedirs(os.path.join(out, "specmesh", "v1"), exist_ok=True)
    include = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    args = ["protoc", f"-I{os.path.join(HERE, 'protos')}", f"-I{include}", f"--python_out={out}",
            f"--pyi_out={out}", f"--grpc_python_out={out}", *protos]
    if protos and protoc.main(args) != 0:
        sys.exit("protoc failed on protos/specmesh/v1")
    open(os.path.join(out, "specmesh", "v1", "__init__.py"), "a").close()


generate_protos()
package_dir = {"specmesh.v1": os.path.join(GEN_ROOT, "specmesh", "v1")}
packages = ["specmesh.v1"]
for folder, name in FOLDERS.items():
    package_dir[name] = folder
    packages += [name] + [f"{name}.{sub}" for sub in find_packages(folder)]

setup(packages=packages, package_dir=package_dir,
      package_data={"specmesh.models": ["data/*"], "specmesh.clients": ["data/*"]})
