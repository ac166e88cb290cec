#!/bin/sh
# Install Debian packages without letting their maintainer scripts start (or enable) services:
# the tests run their own servers with their own config, ports and state folders.
#
# Starting is prevented with a temporary policy-rc.d (exit 101 = "action forbidden"), which
# invoke-rc.d and deb-systemd-invoke both honour; an existing policy-rc.d is left untouched.
# Where systemd runs, the packages' units are disabled again afterwards.
# Usage: scripts/apt-install-no-start.sh "UNIT.service ..." PACKAGE...   (as root, or with sudo)
set -eu

UNITS=$1
shift

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "apt-install-no-start.sh: needs root or sudo" >&2; exit 1; }
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
$SUDO apt-get install -y -qq --no-install-recommends "$@"

if [ -n "$UNITS" ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    # shellcheck disable=SC2086  # UNITS is a list
    $SUDO systemctl disable --now $UNITS >/dev/null 2>&1 || true
fi
