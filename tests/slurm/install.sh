#!/bin/bash
# Install a minimal Slurm (Debian packages) + munge + slurmdbd/MariaDB for the test cluster.
# Needs root and apt; prints what is missing otherwise. Idempotent.
set -euo pipefail
PKGS="slurmctld slurmd slurm-client munge slurmdbd mariadb-server"
missing=""
for p in $PKGS; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
[ -z "$missing" ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "SLURM test cluster needs the Debian packages:$missing (run as root with apt: apt-get install$missing)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >/dev/null
# --no-install-recommends keeps it to a few packages instead of ~40 (HDF5, ROCm plugins, ...)
apt-get install -y -q --no-install-recommends $missing >/dev/null
