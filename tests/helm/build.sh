#!/usr/bin/env bash
# Builds helm from the Go module pinned in this folder (see ../go-tool.sh)
# and prints its path.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$here/../go-tool.sh"
version=v3.22.0
go_tool "$here" helm helm.sh/helm/v3/cmd/helm \
  "-X helm.sh/helm/v3/internal/version.version=$version -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
