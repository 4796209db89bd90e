#!/usr/bin/env bash
# Fresh machine → the test suite. Creates .venv, installs the CPU torch wheel first (a bare `torch`
# requirement would pull a multi-GB CUDA build), then the package with its test extras, then runs pytest.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k slerp`).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .venv ] || python3 -m venv .venv
. .venv/bin/activate
pip install -q --disable-pip-version-check torch==2.13.0
pip install -q --disable-pip-version-check -e '.[test]'
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec python -m pytest -q "$@"
