#!/usr/bin/env bash
# Builds the OLM bundle validator (main.go) from the Go modules pinned in
# this folder (see ../go-tool.sh) and prints its path.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$here/../go-tool.sh"
go_tool "$here" olm-validate .
