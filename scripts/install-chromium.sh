#!/bin/sh
# Install Debian's chromium and chromium-driver for the browser test of the session page
# (tests/test_session_page.py drives it headless through selenium), if missing. Idempotent: a
# second run finds both and does nothing. No service to keep from starting; the shared helper
# is used for its root/sudo handling and non-interactive apt.
# Usage: scripts/install-chromium.sh   (as root, or with sudo available)
set -eu

have_all() {
    command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1
}

if have_all; then
    echo "chromium already installed: $(chromium --version 2>/dev/null | head -n 1)"
    exit 0
fi

sh "$(dirname "$0")/apt-install-no-start.sh" "" chromium chromium-driver

have_all || { echo "install-chromium.sh: chromium or chromedriver missing after install" >&2; exit 1; }
chromium --version 2>/dev/null | head -n 1
chromedriver --version | head -n 1
