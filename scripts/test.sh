#!/usr/bin/env bash
# Fresh machine → the test suite: .venv with the CPU torch wheel and the package's [test] extra, then the
# lint and format checks (ruff), then pytest. Extra arguments go to pytest (e.g. `bash scripts/test.sh -k slerp`).
set -euo pipefail
. "$(dirname "$0")/venv.sh"
warp_venv test
ruff check mergekit_warp tests benchmarks examples
ruff format --check mergekit_warp tests benchmarks examples
exec python -m pytest -q "$@"
