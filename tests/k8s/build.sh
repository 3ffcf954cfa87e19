#!/usr/bin/env bash
# Builds the local test cluster's binaries from the Go modules pinned in
# tests/k8s and tests/kwok: etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler, kubectl and kwok.
#
# Everything it writes lives outside the clone, under $BOWLINE_CACHE
# (default ~/.cache/bowline): the Go module and build caches, and the
# binaries in $BOWLINE_CACHE/k8s/bin. A stamp made of the go.mod/go.sum
# files, this script and the Go version skips the build when nothing changed.
# Prints the directory that holds the binaries.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${BOWLINE_CACHE:-$HOME/.cache/bowline}
out=$cache/k8s/bin
stamp_file=$cache/k8s/stamp

kube_version=v1.33.13
etcd_version=v3.5.21

export GOMODCACHE=$cache/go/mod
export GOCACHE=$cache/go/build
# The committed go.sum files pin every module's hash; the checksum database
# is not needed to verify them (and cannot be reached from every machine).
export GOSUMDB=off
export GOFLAGS="-mod=readonly -buildvcs=false"
export CGO_ENABLED=0

stamp=$(cat "$here/go.mod" "$here/go.sum" "$here/../kwok/go.mod" "$here/../kwok/go.sum" \
  "${BASH_SOURCE[0]}" <(go version) | sha256sum | cut -d' ' -f1)
if [[ -f $stamp_file && $(cat "$stamp_file") == "$stamp" ]]; then
  echo "$out"
  exit 0
fi

mkdir -p "$out"
build_date=$(date -u +%Y-%m-%dT%H:%M:%SZ)
minor=${kube_version#v1.}
minor=${minor%%.*}
kube_ldflags=""
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  kube_ldflags+=" -X $pkg.gitVersion=$kube_version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
  kube_ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$build_date"
done

echo "building Kubernetes $kube_version and etcd $etcd_version (first time: about 6 minutes on 2 cores)" >&2
(
  cd "$here"
  go build -trimpath -ldflags "-s -w $kube_ldflags" -o "$out/" \
    k8s.io/kubernetes/cmd/kube-apiserver \
    k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kube-scheduler \
    k8s.io/kubernetes/cmd/kubectl
  go build -trimpath -ldflags "-s -w -X go.etcd.io/etcd/api/v3/version.GitSHA=$etcd_version" \
    -o "$out/etcd" go.etcd.io/etcd/server/v3
)
echo "building kwok" >&2
(
  cd "$here/../kwok"
  go build -trimpath -ldflags "-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=v0.7.0" \
    -o "$out/kwok" sigs.k8s.io/kwok/cmd/kwok
)
echo "$stamp" > "$stamp_file"
echo "$out"
