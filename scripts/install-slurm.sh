#!/bin/sh
# Install Debian's Slurm (slurmctld, slurmd, the client commands) and munge for the tests, if
# missing (tests/test_slurm.py starts a one-node cluster of its own on loopback).
#
# The packages' maintainer scripts would start system slurmctld, slurmd and munge services; the
# test runs its own daemons with their own config, key, ports and state folders, so they are
# installed without starting anything (scripts/apt-install-no-start.sh).
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

sh "$(dirname "$0")/apt-install-no-start.sh" \
    "slurmctld.service slurmd.service munge.service" slurmctld slurmd slurm-client munge

have_all || { echo "install-slurm.sh: slurm or munge commands missing after install" >&2; exit 1; }
slurmctld -V 2>&1 | head -n 1
munged -V 2>&1 | head -n 1
