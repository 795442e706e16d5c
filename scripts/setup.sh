#!/usr/bin/env bash
# Install everything hpc_mim needs on a fresh Debian 12 machine (as root) into ./.venv.
# On a cluster login node without root, install the Debian packages listed in APT_PACKAGES
# through your admins (or use the cluster's modules) and run with SKIP_APT=1.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  pkg-config libopencv-dev libturbojpeg0-dev   # build deps of ffcv 1.0.2 (sdist only)
  g++ ninja-build                              # DeepSpeed compiles its shm comm op on first use
  dataset-fashion-mnist                        # the embedded real dataset
  slurm-wlm munge                              # the local SLURM cluster used by tests
  chromium                                     # headless: the test that looks at the HTML report
)
PYTHON=${PYTHON:-python3}

if [ "${SKIP_APT:-0}" != 1 ]; then
  missing=()
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
      echo "setup: missing Debian packages: ${missing[*]} (need root, or SKIP_APT=1)" >&2; exit 1
    fi
    echo "setup: apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.hpc_mim-installed
if [ ! -f "$stamp" ] || [ setup.cfg -nt "$stamp" ]; then
  .venv/bin/pip install -q --upgrade pip wheel setuptools
  # torch first and pinned: ffcv's build and deepspeed import it.
  .venv/bin/pip install -q torch==2.14.1 torchvision==0.29.1
  .venv/bin/pip install -q numpy
  .venv/bin/pip install -q --no-build-isolation ffcv==1.0.2
  .venv/bin/pip install -q -e '.[test]'
  touch "$stamp"
fi
echo "setup: done (.venv ready)"
