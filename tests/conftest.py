import os

import torch

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
