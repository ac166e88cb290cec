#!/bin/sh
# Install Debian's Slurm (slurmctld, slurmd, the client commands) and munge for the tests, if
# missing (tests/test_slurm.py starts a one-node cluster of its own on loopback).
#
# The packages' maintainer scripts would start system slurmctld, slurmd and munge services; the
# test runs its own daemons with their own config, key, ports and state folders, so starting is
# prevented with a temporary policy-rc.d (exit 101 = "action forbidden"), which invoke-rc.d and
# deb-systemd-invoke both honour. An existing policy-rc.d is left untouched.
# Usage: scripts/install-slurm.sh   (as root, or with sudo available)
set -eu

have_all() {
    for tool in slurmctld slurmd sbatch squeue scancel sinfo munged mungekey; do
        command -v "$tool" >/dev/null 2>&1 || return 1
    done
}

if have_all; then
    echo "slurm already installed: $(slurmctld -V 2>&1 | head -n 1), $(munged -V 2>&1 | head -n 1)"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "install-slurm.sh: needs root or sudo" >&2; exit 1; }
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
$SUDO apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge

# Where systemd runs, the packages enable their units for the next boot; tests do not want them.
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    $SUDO systemctl disable --now slurmctld.service slurmd.service munge.service \
        >/dev/null 2>&1 || true
fi

have_all || { echo "install-slurm.sh: slurm or munge commands missing after install" >&2; exit 1; }
slurmctld -V 2>&1 | head -n 1
munged -V 2>&1 | head -n 1
