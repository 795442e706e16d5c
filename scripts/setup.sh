#!/usr/bin/env bash
# Install what hpc_mim needs into ./.venv (the pinned Python stack) and, as root on Debian, the
# system packages it builds against. Two profiles:
#   full (default; make setup, demo, test, bench): the build tools below, the embedded
#        Fashion-MNIST, the local SLURM cluster and chromium (the tests').
#   gpu  (--gpu-node or SETUP_PROFILE=gpu; make gpu-check): the build tools only. tests/gpu and
#        benchmarks/gpu_throughput.py make their data (data_prep.synthetic) or need none.
# Without root the full profile stops when a Debian package is missing (SKIP_APT=1 goes on
# without apt). The gpu profile never calls apt there: it checks what the builds need
# (pkg-config's opencv4 and libturbojpeg for ffcv 1.0.2, which builds from its sdist; g++; ninja
# for DeepSpeed's ops; Python's headers), says how to get what is missing without root (cluster
# modules, conda) and goes on: PKG_CONFIG_PATH may still lead ffcv's build to them.
# --dry-run (or SETUP_DRY_RUN=1): print the plan (packages, whether apt runs, pip steps) and
# change nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

profile=${SETUP_PROFILE:-full}
dry_run=${SETUP_DRY_RUN:-0}
for arg in "$@"; do
  case "$arg" in
    --gpu-node) profile=gpu ;;
    --dry-run) dry_run=1 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "setup: unknown argument '$arg' (--gpu-node, --dry-run)" >&2; exit 2 ;;
  esac
done

BUILD_PACKAGES=(
  pkg-config libopencv-dev libturbojpeg0-dev   # build deps of ffcv 1.0.2 (sdist only)
  g++ ninja-build                              # DeepSpeed compiles its ops on first use
)
case "$profile" in
  full) APT_PACKAGES=("${BUILD_PACKAGES[@]}"
          dataset-fashion-mnist                # the embedded real dataset
          slurm-wlm munge                      # the local SLURM cluster used by tests
          chromium) ;;                         # headless: the test that looks at the HTML report
  gpu) APT_PACKAGES=("${BUILD_PACKAGES[@]}") ;;
  *) echo "setup: SETUP_PROFILE=$profile: choose full or gpu" >&2; exit 2 ;;
esac
PYTHON=${PYTHON:-python3}
root=0
[ "$(id -u)" = 0 ] && root=1
say() { echo "setup: $*"; }

say "profile $profile, as $(id -un 2>/dev/null || id -u) ($([ $root = 1 ] && echo root || echo 'not root'))$([ "$dry_run" = 1 ] && echo ', dry run: nothing is changed')"
say "Debian packages of this profile: ${APT_PACKAGES[*]}"

# ------------------------------------------------------------------ Debian packages
missing=()
if command -v dpkg-query >/dev/null; then
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  say "missing Debian packages: ${missing[*]:-none}"
else
  say "no dpkg-query (not Debian): the packages are not looked up; the build tools are checked below"
fi
if [ "${SKIP_APT:-0}" = 1 ]; then
  say "apt: not called (SKIP_APT=1)"
elif [ ${#missing[@]} -eq 0 ]; then
  say "apt: not called (nothing to install)"
elif [ $root = 1 ] && command -v apt-get >/dev/null; then
  say "apt: apt-get install ${missing[*]}"
  if [ "$dry_run" != 1 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
elif [ "$profile" = gpu ]; then
  say "apt: not called ($([ $root = 1 ] && echo 'no apt-get' || echo 'not root')); checking the build tools instead"
else
  echo "setup: missing Debian packages: ${missing[*]} (need root, or SKIP_APT=1 with them installed" \
       "another way; on a GPU node without root: bash scripts/setup.sh --gpu-node)" >&2
  exit 1
fi

# ------------------------------------------------------------------ what the builds need
# Checked by what the builds look for, not by package name: modules and conda provide them too.
lacking=()
if command -v pkg-config >/dev/null; then
  pkg-config --exists opencv4 || lacking+=(opencv4)
  pkg-config --exists libturbojpeg || lacking+=(libturbojpeg)
else
  lacking+=(pkg-config)
fi
command -v g++ >/dev/null || lacking+=(g++)
command -v ninja >/dev/null || [ -x .venv/bin/ninja ] || lacking+=(ninja)
if ! "$PYTHON" -c 'import os, sys, sysconfig; sys.exit(not os.path.isfile(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' 2>/dev/null; then
  lacking+=(Python.h)
fi
if [ ${#lacking[@]} -eq 0 ]; then
  say "build tools: pkg-config opencv4 libturbojpeg, g++, ninja, Python.h found"
else
  say "build tools not found: ${lacking[*]} (PKG_CONFIG_PATH=${PKG_CONFIG_PATH:-})"
  case " ${lacking[*]} " in *" pkg-config "*|*" opencv4 "*|*" libturbojpeg "*)
    say "  pkg-config, opencv4, libturbojpeg (ffcv's build asks pkg-config for opencv4 and libturbojpeg):" \
        "without root, 'module load' the cluster's opencv, libjpeg-turbo and pkg-config modules, or" \
        "'conda install -c conda-forge opencv libjpeg-turbo pkg-config' and" \
        "'export PKG_CONFIG_PATH=\$CONDA_PREFIX/lib/pkgconfig:\$PKG_CONFIG_PATH LD_LIBRARY_PATH=\$CONDA_PREFIX/lib:\$LD_LIBRARY_PATH'" ;;
  esac
  for item in "${lacking[@]}"; do
    case "$item" in
      g++)
        say "  g++ (compiles ffcv's extension): 'module load gcc', or 'conda install -c conda-forge compilers'" ;;
      ninja)
        say "  ninja (DeepSpeed's op builds): the pip package ninja, a DeepSpeed dependency, puts one in" \
            ".venv/bin, which scripts/gpu_check.sh puts on PATH; or 'module load ninja'" ;;
      Python.h)
        say "  Python.h of $PYTHON (ffcv's extension): a Python with its headers, e.g. 'module load python'" \
            "or a conda Python, then PYTHON=/path/to/python3 bash scripts/setup.sh ..." ;;
    esac
  done
  say "going on: the pip step below fails with the build's own message if one is really missing"
fi

# ------------------------------------------------------------------ .venv and the Python stack
stamp=.venv/.hpc_mim-installed
if [ ! -x .venv/bin/python ]; then
  say "venv: $PYTHON -m venv .venv ($("$PYTHON" --version 2>&1))"
  if [ "$dry_run" != 1 ] && ! "$PYTHON" -m venv .venv; then
    echo "setup: '$PYTHON -m venv .venv' failed: install python3-venv (root), or point PYTHON at a" \
         "Python with venv (a cluster module, conda)" >&2
    exit 1
  fi
fi
todo=0
if [ ! -f "$stamp" ] || [ setup.cfg -nt "$stamp" ]; then
  todo=1
  say "pip steps (to do):"
else
  say "pip steps (done already: $stamp is newer than setup.cfg):"
fi
pip_step() {
  say "  .venv/bin/pip $*"
  if [ $todo = 1 ] && [ "$dry_run" != 1 ]; then .venv/bin/pip -q "$@"; fi
}
pip_step install --upgrade pip wheel setuptools
pip_step install torch==2.14.1 torchvision==0.29.1      # first and pinned: ffcv's build and deepspeed import it
pip_step install numpy
pip_step install --no-build-isolation ffcv==1.0.2
pip_step install -e '.[test]'
if [ "$dry_run" = 1 ]; then
  say "dry run: nothing was installed or changed"
else
  [ $todo = 0 ] || touch "$stamp"
  say "done (.venv ready)"
fi
