"""Per-block options applied before any backend wraps the models: activation
checkpointing and ``torch.compile``, in place, so parameter names never gain wrapper
prefixes (``_checkpoint_wrapped_module.``, ``_orig_mod.``)."""

from __future__ import annotations

from torch import nn
from torch.utils.checkpoint import checkpoint

from scalejepa.ijepa import IJEPA


def trained_blocks(model: IJEPA) -> list[nn.Module]:
    """The transformer blocks of the context encoder and the predictor."""
    return [*model.encoder.blocks, *model.predictor.predictor_blocks]


def checkpoint_activations(block: nn.Module) -> None:
    """Recompute the block's activations in backward (non-reentrant checkpoint).

    The instance's ``forward`` is replaced, not the module wrapped: hooks that FSDP2 or
    DeepSpeed put on the block still run around ``__call__``, and names stay unchanged."""
    forward = block.forward

    def checkpointed_forward(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    block.forward = checkpointed_forward


def apply_block_options(model: IJEPA, target: nn.Module, *, activation_checkpointing: bool, compile: bool,
                        compile_backend: str = "inductor") -> None:
    """Activation checkpointing (trained blocks only: the target runs without gradients)
    and per-block ``torch.compile`` (every block), before any sharding, as torchtitan
    orders them: checkpoint -> compile -> shard.

    Every block shares one compiled code object, so the graphs are few and bounded: one
    per kind of call (target encoder without gradients, context encoder, predictor), and
    once lengths change, one in which they are symbolic. The packed lengths change every
    step; Dynamo's automatic dynamic shapes make them symbolic at their first change, and
    the layout's index tensors are built before the blocks (``prepare_layout``), so a
    run recompiles a few times at its start and never after (tests/test_compile.py)."""
    if activation_checkpointing:
        for block in trained_blocks(model):
            checkpoint_activations(block)
    if compile:
        for block in [*trained_blocks(model), *target.blocks]:
            block.compile(backend=compile_backend)
