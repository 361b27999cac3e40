"""The variants ``train_step.py`` measures side by side. Each declares what it runs; its
config overrides are derived from that, so nothing is parsed back out of them.

================================  ==============================================================
``truncate_sdpa``                 batch-min truncation (the reference masks), SDPA (flash): the default
``truncate_sdpa_cudnn``           truncation, SDPA pinned to cuDNN, TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1
``truncate_triton``               truncation, Triton attention and gathers
``pack_triton``                   every sampled context token kept, packed varlen (Triton): the headline
``pack_sdpa``                     packed contexts, SDPA (efficient: flash takes no mask) padded to the longest
``pack_sdpa_nested``              packed contexts, SDPA (flash) on nested jagged tensors
``pack_torch_varlen``             packed contexts, torch.nn.attention.varlen
``truncate_sdpa_compile``         + ``torch.compile`` of every block
``truncate_triton_compile``       Triton + compile
``pack_triton_compile``           pack + Triton + compile
``truncate_sdpa_ac``              + activation checkpointing
``truncate_sdpa_fsdp2``           ``distributed.backend=fsdp2`` on a 1-rank process group
``truncate_sdpa_fsdp2_ac``        FSDP2 + activation checkpointing
``reference_baseline``            the reference recipe's per-step work on our code: truncation,
                                  eager softmax(QK^T)V attention, per-parameter EMA loop,
                                  non-fused AdamW, no compile
``reference_code``                the reference repository itself (``third_party/ijepa``, see
                                  ``benchmarks/_reference_ijepa.py``), if present
================================  ==============================================================
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    context: str = "truncate"  # mask.context
    attn_impl: str = "sdpa"  # model.attn_impl
    sdpa_backend: str = "flash"  # model.sdpa_backend, for the SDPA paths
    backend: str = "none"  # distributed.backend
    compile: bool = False
    activation_checkpointing: bool = False
    reference_recipe: bool = False  # the reference's optimizer (torch default AdamW) and EMA loop
    reference_code: bool = False  # the reference repository's model and step instead of ours
    env: dict = field(default_factory=dict)  # environment variables the variant runs under

    @property
    def uses_sdpa(self) -> bool:
        return self.attn_impl in ("sdpa", "sdpa_nested")

    @property
    def overrides(self) -> list[str]:
        """The config overrides that select this variant."""
        out = [f"mask.context={self.context}", f"model.attn_impl={self.attn_impl}"]
        if self.uses_sdpa:
            out.append(f"model.sdpa_backend={self.sdpa_backend}")
        if self.backend != "none":
            out.append(f"distributed.backend={self.backend}")
        if self.compile:
            out.append("distributed.compile=true")
        if self.activation_checkpointing:
            out.append("distributed.activation_checkpointing=true")
        if self.reference_recipe:
            out += ["optim.implementation=foreach", "optim.ema_impl=loop"]
        return out

    @property
    def tags(self) -> dict:
        """What the variant runs, for the results and their table."""
        return {"context": self.context, "attn_impl": self.attn_impl,
                "sdpa_backend": self.sdpa_backend if self.uses_sdpa else None, "backend": self.backend,
                "compile": self.compile, "activation_checkpointing": self.activation_checkpointing}


VARIANTS: dict[str, Variant] = {v.name: v for v in [
    Variant("truncate_sdpa", "truncation, SDPA (flash, default)"),
    Variant("truncate_sdpa_cudnn", "truncation, SDPA pinned to cuDNN", sdpa_backend="cudnn",
            env={"TORCH_CUDNN_SDPA_AVOID_RECOMPILE": "1"}),
    Variant("truncate_triton", "truncation, Triton kernels", attn_impl="triton"),
    Variant("pack_triton", "full contexts packed, Triton varlen", context="pack", attn_impl="triton"),
    Variant("pack_sdpa", "full contexts, SDPA (efficient) padded to longest", context="pack",
            sdpa_backend="efficient"),
    Variant("pack_sdpa_nested", "full contexts packed, SDPA (flash) on nested jagged tensors", context="pack",
            attn_impl="sdpa_nested"),
    Variant("pack_torch_varlen", "full contexts packed, torch.nn.attention.varlen", context="pack",
            attn_impl="torch_varlen"),
    Variant("truncate_sdpa_compile", "truncation, SDPA, torch.compile", compile=True),
    Variant("truncate_triton_compile", "truncation, Triton, torch.compile", attn_impl="triton", compile=True),
    Variant("pack_triton_compile", "pack, Triton, torch.compile", context="pack", attn_impl="triton", compile=True),
    Variant("truncate_sdpa_ac", "truncation, SDPA, activation ckpt", activation_checkpointing=True),
    Variant("truncate_sdpa_fsdp2", "truncation, SDPA, FSDP2 on 1 GPU", backend="fsdp2"),
    Variant("truncate_sdpa_fsdp2_ac", "truncation, SDPA, FSDP2 on 1 GPU, activation ckpt", backend="fsdp2",
            activation_checkpointing=True),
    Variant("reference_baseline", "reference recipe on our code: truncation, eager attention, EMA loop, "
            "non-fused AdamW", attn_impl="eager", reference_recipe=True),
    Variant("reference_code", "the reference repository's code (third_party/ijepa)", attn_impl="eager",
            reference_code=True),
]}
# Triton variants take ~15 s a step in the CPU interpreter and compile ~1 min: not in the smoke
# default; nor are the variants whose kernels exist only on CUDA (efficient and cuDNN SDPA,
# torch.nn.attention.varlen, flash on nested tensors).
SMOKE_VARIANTS = ["truncate_sdpa", "truncate_sdpa_fsdp2", "truncate_sdpa_ac", "truncate_sdpa_fsdp2_ac",
                  "reference_baseline", "reference_code"]
