import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from tiny import make_tiny_llama, perturb


@pytest.fixture(scope="session")
def tiny_init(tmp_path_factory) -> Path:
    """A random tiny Llama (fp32, untied) used as θ_init / θ_sft."""
    return make_tiny_llama(tmp_path_factory.mktemp("init") / "init", seed=0)


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory, tiny_init) -> list[Path]:
    """Three 'RL runs': the init plus independent noise (task vectors ≈ orthogonal, as in the paper)."""
    base = tmp_path_factory.mktemp("runs")
    return [perturb(tiny_init, base / f"run{i}", seed=100 + i) for i in range(3)]
