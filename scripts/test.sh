#!/usr/bin/env bash
# Fresh machine → the test suite: .venv with the CPU torch wheel and the package's [test] extra, then
# pytest. Extra arguments go to pytest (e.g. `bash scripts/test.sh -k slerp`).
set -euo pipefail
. "$(dirname "$0")/venv.sh"
warp_venv test
exec python -m pytest -q "$@"
