"""The start every Ray benchmark shares: this repository importable, and the environment Ray and
DeepSpeed need on a CPU machine (the same as .ci/run sets), in place before either is imported.
Each script imports it first (`python benchmarks/<name>.py` puts this folder on sys.path)."""

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "benchmarks" / "out"  # results: <name>.json and <name>.md (not committed)

sys.path.insert(0, str(REPO))
for key, value in {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "DS_ACCELERATOR": "cpu",
                   "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(key, value)
