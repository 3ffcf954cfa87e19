#!/usr/bin/env bash
# Builds helm from the Go module pinned in this folder's go.mod/go.sum into
# $BOWLINE_CACHE/helm/helm, unless a stamp of those files, this script and
# the Go version says it is up to date.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${BOWLINE_CACHE:-$HOME/.cache/bowline}
out=$cache/helm
stamp_file=$out/stamp
version=v3.22.0

export GOMODCACHE=$cache/go/mod
export GOCACHE=$cache/go/build
export GOSUMDB=off
export GOFLAGS="-mod=readonly -buildvcs=false"
export CGO_ENABLED=0

stamp=$(cat "$here/go.mod" "$here/go.sum" "${BASH_SOURCE[0]}" <(go version) | sha256sum | cut -d' ' -f1)
if [[ -x $out/helm && -f $stamp_file && $(cat "$stamp_file") == "$stamp" ]]; then
  exit 0
fi
mkdir -p "$out"
(cd "$here" && go build -trimpath \
  -ldflags "-X helm.sh/helm/v3/internal/version.version=$version -X helm.sh/helm/v3/internal/version.gitTreeState=clean" \
  -o "$out/helm" helm.sh/helm/v3/cmd/helm)
echo "$stamp" > "$stamp_file"
