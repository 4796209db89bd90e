# Sourced by scripts/test.sh and scripts/demo.sh: `warp_venv EXTRA` creates .venv in the repository root
# (if missing), activates it, installs the CPU torch wheel first (a bare `torch` requirement would pull a
# multi-GB CUDA build), then this package with its [EXTRA] dependencies, and keeps everything offline.
warp_venv() {
    cd "$(dirname "${BASH_SOURCE[0]}")/.."
    [ -d .venv ] || python3 -m venv .venv
    . .venv/bin/activate
    pip install -q --disable-pip-version-check torch==2.13.0
    pip install -q --disable-pip-version-check -e ".[$1]"
    export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
}
