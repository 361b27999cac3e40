import os
import sys
from pathlib import Path

import torch

# kernels/ is installed as scalejepa.kernels. With the checkout's root on sys.path (``python
# -m pytest`` puts the working directory there) it would also be a top-level ``kernels``
# that shadows Hugging Face's ``kernels`` package, which transformers imports to load a
# model (the export tests). Nothing is imported from the root: scalejepa is installed.
_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _ROOT]

# Triton reads TRITON_INTERPRET when a kernel is defined (at import of scalejepa.kernels), so it
# must be set before any test module imports it: without a GPU, kernels run in the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# One intra-op thread per process: tests run several processes at once (loader workers,
# 2-3 ranks) on CI's 2 cores, where oversubscribed OpenMP threads spin-wait on each other.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Built-in shard sets are cached under a per-session folder, not the user's home."""
    os.environ["SCALEJEPA_CACHE"] = str(tmp_path_factory.mktemp("scalejepa-cache"))
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
