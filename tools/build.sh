#!/usr/bin/env bash
# Builds the Go test tooling (kube-apiserver, etcd, CoreDNS, helm) from the wrapper
# modules under tools/, once per version: binaries go to $MESHBRIDGE_TOOLS_DIR
# (default: <repo>/target/tools) under a version-keyed folder, and an existing binary is
# reused. Usage: tools/build.sh [kube-apiserver|etcd|coredns|helm|all]  (default all)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
out="${MESHBRIDGE_TOOLS_DIR:-$root/target/tools}"
export GOTOOLCHAIN=local GOWORK=off CGO_ENABLED=0 GOFLAGS=-buildvcs=false
# Versions: keep in step with testkit/src/kube.rs (it looks for the same paths).
KUBE_VERSION=v1.37.2
ETCD_VERSION=v3.7.3
COREDNS_VERSION=v1.14.7
HELM_VERSION=v4.3.2

if ! command -v go >/dev/null; then
  echo "tools/build.sh: 'go' is not on PATH; Go 1.26 is needed to build the kube test tooling" >&2
  exit 1
fi

build() { # name module-dir version package [ldflags]
  local name="$1" dir="$2" version="$3" pkg="$4" ldflags="${5:-}"
  local bin="$out/$name/$version/$name"
  if [ -x "$bin" ]; then
    echo "tools/build.sh: $name $version cached at $bin"
    return
  fi
  echo "tools/build.sh: building $name $version (cold builds take minutes)"
  local start=$SECONDS
  mkdir -p "$(dirname "$bin")"
  (cd "$here/$dir" && go build -mod=readonly -trimpath -ldflags="-s -w $ldflags" -o "$bin.tmp" "$pkg")
  mv "$bin.tmp" "$bin"
  echo "tools/build.sh: built $name $version in $((SECONDS - start)) s -> $bin"
}

what="${1:-all}"
case "$what" in
  kube-apiserver|all)
    # The version stamp a release build carries (the API server derives its emulation
    # version from it; an unstamped build says v0.0.0-master).
    minor="${KUBE_VERSION#v1.}"; minor="${minor%%.*}"
    v=k8s.io/component-base/version
    build kube-apiserver k8s "$KUBE_VERSION" k8s.io/kubernetes/cmd/kube-apiserver \
      "-X $v.gitVersion=$KUBE_VERSION -X $v.gitMajor=1 -X $v.gitMinor=$minor -X $v.gitTreeState=clean" ;;&
  etcd|all) build etcd etcd "$ETCD_VERSION" . ;;&
  coredns|all) build coredns coredns "$COREDNS_VERSION" github.com/coredns/coredns ;;&
  helm|all) build helm helm "$HELM_VERSION" helm.sh/helm/v4/cmd/helm ;;&
  kube-apiserver|etcd|coredns|helm|all) ;;
  *) echo "tools/build.sh: unknown tool '$what'" >&2; exit 2 ;;
esac
