#!/usr/bin/env bash
# Installs the Debian packages molt builds against, and the project-local Python virtualenv
# (.venv in the repository root, git-ignored) with the official `openai` client that the
# end-to-end tests of `molt serve` drive it with. Idempotent and non-interactive: packages
# already present are skipped, `apt-get update` runs at most once, and the virtualenv is
# left alone once it has the pinned client. --no-venv skips the virtualenv (the quickstart
# does not need it).
set -euo pipefail

venv_wanted=1
[ "${1:-}" == "--no-venv" ] && venv_wanted=0

pkgs=(build-essential cmake pkg-config libopenblas-dev libopenblas-openmp-dev libhdf5-dev libarchive-dev check
      libjansson-dev libpcre2-dev libyaml-dev libmicrohttpd-dev libzstd-dev zlib1g-dev
      liblzma-dev libopenmpi-dev openmpi-bin
      librsvg2-bin clang libclang-rt-14-dev libomp-14-dev python3 python3-venv curl)

missing=()
for p in "${pkgs[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$p")
    fi
done

root=$(cd "$(dirname "$0")/.." && pwd)
openai_pin="openai==3.57.0"

# The virtualenv of the serve tests: created once, the client pinned.
setup_venv() {
    local venv="$root/.venv"
    [ "$venv_wanted" == 1 ] || return 0
    if "$venv/bin/python" -c 'import importlib.metadata as m, sys; sys.exit(m.version("openai") != sys.argv[1])' \
        "${openai_pin#openai==}" 2>/dev/null; then
        echo "setup: $venv has $openai_pin"
        return
    fi
    echo "setup: creating $venv with $openai_pin"
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check "$openai_pin"
}

if [ ${#missing[@]} -eq 0 ]; then
    echo "setup: all ${#pkgs[@]} packages present"
    setup_venv
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
setup_venv
echo "setup: done"
