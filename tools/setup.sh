#!/usr/bin/env bash
# Installs the Debian packages molt builds against. Idempotent and non-interactive:
# packages already present are skipped, and `apt-get update` runs at most once.
set -euo pipefail

pkgs=(build-essential cmake pkg-config libopenblas-dev libopenblas-openmp-dev libhdf5-dev libarchive-dev check
      libjansson-dev libpcre2-dev libyaml-dev libmicrohttpd-dev libzstd-dev zlib1g-dev
      liblzma-dev libopenmpi-dev openmpi-bin
      librsvg2-bin clang libclang-rt-14-dev libomp-14-dev)

missing=()
for p in "${pkgs[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$p")
    fi
done

if [ ${#missing[@]} -eq 0 ]; then
    echo "setup: all ${#pkgs[@]} packages present"
    exit 0
fi

sudo=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "setup: need root or sudo to install: ${missing[*]}" >&2; exit 1; }
    sudo="sudo"
fi
echo "setup: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
echo "setup: done"
