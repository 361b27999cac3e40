"""Triton kernels for packed (variable-length) I-JEPA training, each with a plain-PyTorch reference.

Depends only on torch and (optionally) triton. Importing registers the ``scalejepa::*`` custom
ops and nothing else; without triton the ``*_reference`` functions still work and the kernels
raise a clear RuntimeError when called. CPU tensors need ``TRITON_INTERPRET=1`` set before import.
"""

from .gather_tokens import gather_tokens, gather_tokens_reference
from .predictor_input import build_predictor_input, build_predictor_input_reference
from .varlen_attention import varlen_attention, varlen_attention_reference

__all__ = [
    "varlen_attention",
    "varlen_attention_reference",
    "gather_tokens",
    "gather_tokens_reference",
    "build_predictor_input",
    "build_predictor_input_reference",
]
