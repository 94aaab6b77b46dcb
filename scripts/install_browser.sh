#!/usr/bin/env bash
# Debian's Chromium for the report's browser test (tests/test_report.py), driven by the Python
# `playwright` package with executable_path=/usr/bin/chromium (never `playwright install`, which
# downloads a browser build). A no-op when chromium is already there; needs root for apt-get.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "install_browser.sh: chromium is missing and apt-get needs root; the browser test will be skipped" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium >/dev/null
chromium --version
