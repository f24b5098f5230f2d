#!/usr/bin/env bash
# Makes sure the browser the web playground's tests drive is installed: Debian's `chromium` and
# `chromium-driver` (/usr/bin/chromium, /usr/bin/chromedriver). Idempotent and quiet: when both
# are there it only checks. When they cannot be installed (no root, no package source) it says
# so and returns 0: the UI tests then skip with that reason; nothing else depends on it.
set -uo pipefail

if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
    exit 0
fi
if ! command -v apt-get >/dev/null; then
    echo "browser.sh: no apt-get here; the UI tests will skip (install chromium and chromium-driver)" >&2
    exit 0
fi
SUDO=()
if [ "$(id -u)" != 0 ]; then
    if sudo -n true 2>/dev/null; then
        SUDO=(sudo -n)
    else
        echo "browser.sh: not root and no sudo; the UI tests will skip (install chromium and chromium-driver)" >&2
        exit 0
    fi
fi
echo "browser.sh: installing chromium and chromium-driver" >&2
log=$(mktemp)
if ! { "${SUDO[@]}" apt-get update -qq &&
    DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq \
        chromium chromium-driver; } >"$log" 2>&1; then
    tail -n 5 "$log" >&2
    echo "browser.sh: the install failed; the UI tests will skip" >&2
fi
rm -f "$log"
exit 0
