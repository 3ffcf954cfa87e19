#!/usr/bin/env bash
# Builds Jaeger's all-in-one from the Go module pinned in this folder (see
# ../go-tool.sh) and prints its path: the node agent runs the mesh's Jaeger
# addon with it (v1.72.0, the release config/releases.yaml pins). Without
# the UI's built assets: the collectors and the query API serve, the web UI
# shows a placeholder.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$here/../go-tool.sh"
go_tool "$here" jaeger github.com/jaegertracing/jaeger/cmd/all-in-one \
  "-X github.com/jaegertracing/jaeger/internal/version.latestVersion=v1.72.0"
