#!/usr/bin/env bash
# Screenshot a run report with headless Chromium: scripts/screenshot_report.sh RUN_DIR OUT.png
# Builds RUN_DIR/report first when it is missing. Needs `chromium` (Debian: apt-get install -y chromium).
set -euo pipefail
if [[ $# -ne 2 ]]; then
    echo "usage: $0 RUN_DIR OUT.png" >&2
    exit 2
fi
run_dir=$1
out=$2
index="$run_dir/report/index.html"
if [[ ! -f "$index" ]]; then
    "${PYTHON:-python}" -m posttrain report "$run_dir" >/dev/null
fi
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
if [[ -z "$browser" ]]; then
    echo "no chromium found; install it with: apt-get install -y chromium" >&2
    exit 1
fi
out_abs=$(realpath -m "$out")
mkdir -p "$(dirname "$out_abs")"
"$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size="${WINDOW_SIZE:-1280,2400}" \
    --screenshot="$out_abs" "file://$(realpath "$index")" 2>/dev/null
test -s "$out_abs"
echo "$out_abs"
