# Sourced by tests/helm/build.sh and tests/kstatus/build.sh.
#
# go_tool DIR NAME PACKAGE [LDFLAGS]: builds PACKAGE from the Go module
# pinned in DIR (go.mod, go.sum) into $BOWLINE_CACHE/NAME/NAME, unless a
# stamp of DIR's module and sources, the calling script and the Go version
# says it is up to date, and prints the binary's path.

go_tool() {
  local dir=$1 name=$2 package=$3 ldflags=${4:-}
  local cache=${BOWLINE_CACHE:-$HOME/.cache/bowline}
  local out=$cache/$name
  export GOMODCACHE=$cache/go/mod
  export GOCACHE=$cache/go/build
  # The committed go.sum pins every module's hash.
  export GOSUMDB=off
  export GOFLAGS="-mod=readonly -buildvcs=false"
  export CGO_ENABLED=0
  local stamp
  stamp=$(shopt -s nullglob; cat "$dir"/go.mod "$dir"/go.sum "$dir"/*.go "$0" "${BASH_SOURCE[0]}" \
    <(go version) | sha256sum | cut -d' ' -f1)
  if ! [[ -x $out/$name && -f $out/stamp && $(cat "$out/stamp") == "$stamp" ]]; then
    mkdir -p "$out"
    (cd "$dir" && go build -trimpath -ldflags "$ldflags" -o "$out/$name" "$package")
    echo "$stamp" > "$out/stamp"
  fi
  echo "$out/$name"
}
