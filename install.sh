#!/usr/bin/env bash
# Fresh-machine set-up: system packages, then .venv/ with the pinned Python stack.
# Usage: bash install.sh [--test]   (--test adds the test-only packages)
set -euo pipefail
cd "$(dirname "$0")"

APT_PKGS=(libopencv-dev libturbojpeg0-dev pkg-config dataset-fashion-mnist)
if [[ "${1:-}" == "--test" ]]; then
  APT_PKGS+=(slurm-wlm munge chromium)
fi
missing=()
for p in "${APT_PKGS[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if (( ${#missing[@]} )); then
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

[[ -x .venv/bin/python ]] || python3 -m venv .venv
PIP=(.venv/bin/python -m pip install -q -c constraints.txt)
# torch first and pinned: an unpinned torch requirement pulls a multi-GB CUDA build.
"${PIP[@]}" torch==2.13.0 numpy
if [[ "${1:-}" == "--test" ]]; then
  DS_BUILD_OPS=0 "${PIP[@]}" -e '.[test]'
  # SpikingJelly is a test-only reference; its declared deps pull a CUDA torch, so it goes
  # in alone, with the one dependency its neuron modules import (loguru).
  "${PIP[@]}" --no-deps spikingjelly==2.0.0 loguru
  # NIR importers our export is checked against (tests only); norse declares torchvision,
  # which it does not need and which would pull a CUDA torch: all without dependencies.
  "${PIP[@]}" --no-deps nirtorch==2.6 snntorch==1.0.0 norse==1.1.0
  # NeuroBench, the counter our energy counts are checked against (tests only): its metrics
  # import torch, snntorch, numpy and tqdm alone; its declared torchaudio, tonic and numba serve
  # its data sets, and torchaudio would pull a CUDA torch.
  "${PIP[@]}" --no-deps neurobench==2.3.0
else
  DS_BUILD_OPS=0 "${PIP[@]}" -e .
fi
