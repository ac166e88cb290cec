#!/bin/sh
# Install Debian's `prometheus` package (prometheus + promtool) for the tests, if missing.
#
# The package's maintainer scripts would start a system prometheus service; tests run their own
# server on loopback, so starting is prevented with a temporary policy-rc.d (exit 101 = "action
# forbidden"), which invoke-rc.d and deb-systemd-invoke both honour. An existing policy-rc.d is
# left untouched. Usage: scripts/install-prometheus.sh   (as root, or with sudo available)
set -eu

if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
    echo "prometheus already installed: $(prometheus --version 2>&1 | head -n 1)"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "install-prometheus.sh: needs root or sudo" >&2; exit 1; }
    SUDO="sudo"
fi

POLICY=/usr/sbin/policy-rc.d
ADDED_POLICY=0
if [ ! -e "$POLICY" ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$POLICY" >/dev/null
    $SUDO chmod 755 "$POLICY"
    ADDED_POLICY=1
fi
cleanup() {
    if [ "$ADDED_POLICY" -eq 1 ]; then $SUDO rm -f "$POLICY"; fi
}
trap cleanup EXIT

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends prometheus

# Where systemd runs, the package enables its unit for the next boot; tests do not want it.
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    $SUDO systemctl disable --now prometheus.service >/dev/null 2>&1 || true
fi

prometheus --version 2>&1 | head -n 1
promtool --version 2>&1 | head -n 1
