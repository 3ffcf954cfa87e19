#!/usr/bin/env bash
# Builds the kstatus checker (main.go) from the Go modules pinned in this
# folder's go.mod/go.sum into $BOWLINE_CACHE/kstatus/kstatus, unless a stamp
# of those files, this script and the Go version says it is up to date.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${BOWLINE_CACHE:-$HOME/.cache/bowline}
out=$cache/kstatus
stamp_file=$out/stamp

export GOMODCACHE=$cache/go/mod
export GOCACHE=$cache/go/build
export GOSUMDB=off
export GOFLAGS="-mod=readonly -buildvcs=false"
export CGO_ENABLED=0

stamp=$(cat "$here/go.mod" "$here/go.sum" "$here/main.go" "${BASH_SOURCE[0]}" <(go version) \
  | sha256sum | cut -d' ' -f1)
if [[ -x $out/kstatus && -f $stamp_file && $(cat "$stamp_file") == "$stamp" ]]; then
  exit 0
fi
mkdir -p "$out"
(cd "$here" && go build -trimpath -o "$out/kstatus" .)
echo "$stamp" > "$stamp_file"
