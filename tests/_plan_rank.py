"""One rank of a real (gloo) run of the planner's trace, for tests/test_plan.py:
``torchrun --nproc-per-node=2 tests/_plan_rank.py OUT.json override...``. Rank 0 writes the
trace's memory by category and its op and collective totals."""

import json
import sys

from scalejepa.config import load_config
from scalejepa.dist_env import init_distributed, shutdown_distributed
from scalejepa.plan.trace import trace_step


def main() -> None:
    out, overrides = sys.argv[1], sys.argv[2:]
    env = init_distributed("cpu")
    try:
        trace = trace_step(load_config("debug_cpu", overrides), env.world_size, fake=False)
        if env.is_main:
            with open(out, "w") as f:
                json.dump({"memory": trace.memory, "peak": trace.peak_bytes, "totals": trace.totals()}, f)
    finally:
        shutdown_distributed()


if __name__ == "__main__":
    main()
