#!/usr/bin/env bash
# Builds Prometheus from the Go module pinned in this folder (see
# ../go-tool.sh) and prints its path: the node agent runs the mesh's
# Prometheus addon with it. Debian's package cannot: it is built without the
# Kubernetes service discovery the addon's configuration scrapes with.
# Module v0.305.0 is Prometheus v3.5.0, the release config/releases.yaml
# pins. Without the built-in UI assets: the API and /metrics serve, the web
# UI does not.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$here/../go-tool.sh"
version=3.5.0
go_tool "$here" prometheus github.com/prometheus/prometheus/cmd/prometheus \
  "-X github.com/prometheus/common/version.Version=$version -X github.com/prometheus/common/version.Branch=release-3.5"
