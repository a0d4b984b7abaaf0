#!/usr/bin/env bash
# Render a `clobjob verify --report` HTML file in headless Chromium and print the PNG's path.
# Usage: scripts/report_screenshot.sh report.html [out.png]
# Installs Debian's chromium when it is missing (needs root, as in the CI image).
set -euo pipefail

report="${1:?usage: $0 report.html [out.png]}"
out="${2:-${report%.html}.png}"
[[ -f "$report" ]] || { echo "no such file: $report" >&2; exit 2; }

browser="$(command -v chromium || command -v chromium-browser || true)"
if [[ -z "$browser" ]]; then
  apt-get update >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium >&2
  browser="$(command -v chromium)"
fi

profile="$(mktemp -d)"
trap 'rm -rf "$profile"' EXIT
out_abs="$(realpath -m "$out")"
timeout 120 "$browser" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync \
  --user-data-dir="$profile" --screenshot="$out_abs" --window-size=1200,900 \
  "file://$(realpath "$report")" >&2
[[ -s "$out_abs" ]] || { echo "chromium wrote no screenshot" >&2; exit 1; }
echo "$out_abs"
