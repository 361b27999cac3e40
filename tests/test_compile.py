"""``distributed.compile=true``: per-block ``torch.compile`` over steps whose packed lengths
change every step compiles a few graphs at the start and never again.

Dynamo guards the Python ints of a block's ``Seqs`` and the shapes of its tensors; a run that
recompiled on every new length would hit ``recompile_limit`` within a few steps and silently
fall back to eager. The ``aot_eager`` backend traces forward and backward as inductor does
(Dynamo and AOTAutograd: the same guards, the same graphs) without generating code, which
would take minutes on two cores.
"""

import pytest
import torch
from torch._dynamo.utils import counters

from scalejepa.config import load_config
from scalejepa.data.pipeline import SyntheticLoader
from scalejepa.dist_env import DistEnv
from scalejepa.masks import MaskGenerator
from scalejepa.parallel import build_engine
from scalejepa.step import StepSchedule, train_step

STEPS = 20
# One graph per kind of block call (target encoder without gradients, context encoder,
# predictor) plus the one with symbolic lengths: 3 for truncate, 4 for pack when measured.
MAX_GRAPHS = 6


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def train(context: str, compile: bool) -> tuple[list[float], list[int], set]:
    """Losses, compiled-graph count after each step, and the context lengths seen."""
    config = load_config("debug_cpu", [f"mask.context={context}", "model.pred_depth=1",
                                       f"distributed.compile={str(compile).lower()}",
                                       "distributed.compile_backend=aot_eager"])
    engine = build_engine(config, DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    loader = SyntheticLoader(batch_size=4, image_size=32, mask_generator=MaskGenerator(8, config.mask), seed=0)
    schedule = StepSchedule(lr=1e-3, weight_decay=0.04, ema_momentum=0.996)
    losses, graphs, lengths = [], [], set()
    batches = []

    def next_batch():
        batches.append(next(loader))
        return batches[-1]

    for step in range(STEPS):
        result = train_step(engine, next_batch, schedule, step=step)
        seqs = batches[-1].masks.context.seqs
        lengths.add(tuple(torch.diff(seqs.cu_seqlens).tolist()))
        losses.append(float(result.loss))
        graphs.append(counters["stats"]["unique_graphs"])
    return losses, graphs, lengths


@pytest.mark.parametrize("context", ["truncate", "pack"])
def test_compiled_blocks_compile_a_bounded_number_of_graphs(context):
    losses, graphs, lengths = train(context, compile=True)
    assert len(lengths) >= STEPS // 2  # fresh masks: the lengths did change
    assert counters["frames"]["total"] == counters["frames"]["ok"]  # no frame fell back to eager
    assert 3 <= graphs[-1] <= MAX_GRAPHS, graphs
    assert graphs[-1] == graphs[2], graphs  # nothing compiled after the first steps
    eager_losses, _, _ = train(context, compile=False)
    assert losses == pytest.approx(eager_losses, rel=1e-5)
