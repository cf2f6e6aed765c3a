#!/usr/bin/env bash
# Headless Chromium and ChromeDriver for `voxblock view --screenshot` and tests/test_view.py.
#
#   ci/chromium.sh     install Debian's chromium and chromium-driver if missing (needs root and
#                      apt-get), then print the two binaries' paths, one a line: chromium, then
#                      chromedriver. Exit code 2: cannot run here (not installed, cannot install).
#
# The apt log goes to ${VOXBLOCK_CHROMIUM_DIR:-/tmp/voxblock-chromium}/apt.log.
set -euo pipefail

STATE="${VOXBLOCK_CHROMIUM_DIR:-/tmp/voxblock-chromium}"

say() { echo "chromium.sh: $*" >&2; }
die() { say "$*"; exit 2; }

find_browser() {
    local name
    for name in chromium chromium-browser; do
        command -v "$name" 2>/dev/null && return 0
    done
    return 1
}

installed() { find_browser >/dev/null && command -v chromedriver >/dev/null; }

if ! installed; then
    [[ $EUID -eq 0 ]] || die "Chromium is not installed and installing it needs root"
    command -v apt-get >/dev/null || die "Chromium is not installed and there is no apt-get"
    mkdir -p "$STATE"
    packages=(chromium chromium-driver)
    say "installing ${packages[*]}"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -q --no-install-recommends "${packages[@]}" >"$STATE/apt.log" 2>&1; then
        apt-get update -q >>"$STATE/apt.log" 2>&1 || die "apt-get update failed (see $STATE/apt.log)"
        apt-get install -y -q --no-install-recommends "${packages[@]}" >>"$STATE/apt.log" 2>&1 \
            || die "apt-get install failed (see $STATE/apt.log)"
    fi
    installed || die "chromium or chromedriver still missing after apt-get install"
fi
browser="$(find_browser)"
"$browser" --headless=new --no-sandbox --version >/dev/null 2>&1 || die "$browser does not start"
echo "$browser"
command -v chromedriver
