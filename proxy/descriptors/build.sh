#!/usr/bin/env bash
# Builds the descriptor writer (main.go) from the Go modules pinned in this
# folder (see tests/go-tool.sh) and prints its path. `make descriptors`
# runs it to write proxy/src/envoy.binpb.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$here/../../tests/go-tool.sh"
go_tool "$here" envoy-descriptors .
