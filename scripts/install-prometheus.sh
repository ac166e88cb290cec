#!/bin/sh
# Install Debian's `prometheus` package (prometheus + promtool) for the tests, if missing.
#
# The package's maintainer scripts would start a system prometheus service; tests run their own
# server on loopback, so it is installed without starting anything
# (scripts/apt-install-no-start.sh). Usage: scripts/install-prometheus.sh   (as root or sudo)
set -eu

if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
    echo "prometheus already installed: $(prometheus --version 2>&1 | head -n 1)"
    exit 0
fi

sh "$(dirname "$0")/apt-install-no-start.sh" "prometheus.service" prometheus

prometheus --version 2>&1 | head -n 1
promtool --version 2>&1 | head -n 1
