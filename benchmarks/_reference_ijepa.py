"""Runs the reference I-JEPA code (facebookresearch/ijepa) for side-by-side timing.

The reference code is not part of this repository (its licence is CC BY-NC 4.0): put a
checkout in the git-ignored ``third_party/ijepa`` (or pass ``--reference-dir``)::

    git clone https://github.com/facebookresearch/ijepa third_party/ijepa

Only its model, mask-collator and tensor helpers are imported (``src.helper``,
``src.masks``, ``src.utils``); its ``src.train`` needs torchvision and a data set, so the
per-step work of its training loop is restated here, in order: LR and WD schedule steps,
target forward + layer norm + ``apply_masks`` + ``repeat_interleave_batch``, context
encoder + predictor, smooth-L1 loss under bf16 autocast, ``GradScaler`` backward and step
(as the reference does even in bf16), ``grad_logger`` (a host sync per weight matrix, every
step), ``zero_grad``, the per-parameter EMA loop and ``float(loss)``. The models are wrapped
in ``DistributedDataParallel`` when a process group exists (a 1-rank one on a single GPU),
as the reference always does. Masks come from its own collator, drawn before timing.
"""

from __future__ import annotations

import copy
import logging
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

DEFAULT_REFERENCE_DIR = Path(__file__).resolve().parents[1] / "third_party" / "ijepa"
REFERENCE_ARCHS = ("vit_tiny", "vit_small", "vit_base", "vit_large", "vit_huge", "vit_giant")


class ReferenceUnavailable(RuntimeError):
    pass


def _import_reference(ref_dir: Path):
    if not (ref_dir / "src" / "helper.py").is_file():
        raise ReferenceUnavailable(
            f"reference code not found at {ref_dir}: git clone https://github.com/facebookresearch/ijepa {ref_dir} "
            "(kept out of git) to time it side by side"
        )
    if str(ref_dir) not in sys.path:
        sys.path.insert(0, str(ref_dir))
    root = logging.getLogger()
    level = root.level
    from src.helper import init_model, init_opt  # its import configures the root logger at INFO
    from src.masks.multiblock import MaskCollator
    from src.masks.utils import apply_masks
    from src.utils.logging import grad_logger
    from src.utils.tensors import repeat_interleave_batch

    root.setLevel(max(level, logging.WARNING))  # init_model logs the whole model at INFO
    return init_model, init_opt, MaskCollator, apply_masks, grad_logger, repeat_interleave_batch


def reference_collator(MaskCollator, config):
    """The reference's multi-block collator, configured as our ``config.mask``."""
    m, mask = config.model, config.mask
    return MaskCollator(input_size=(m.image_size, m.image_size), patch_size=m.patch_size,
                        enc_mask_scale=mask.context_scale, pred_mask_scale=mask.target_scale,
                        aspect_ratio=mask.target_aspect, nenc=1, npred=mask.num_targets,
                        min_keep=mask.min_keep, allow_overlap=mask.allow_overlap)


class ReferenceRunner:
    """One reference training step at a time on pre-drawn masks and device-side images."""

    def __init__(self, ref_dir: Path, config, batch_size: int, device: torch.device, num_batches: int,
                 arch: str | None = None):
        (init_model, init_opt, MaskCollator, self.apply_masks, self.grad_logger,
         self.repeat_interleave_batch) = _import_reference(Path(ref_dir))
        m, mask, optim = config.model, config.mask, config.optim
        self.arch = arch or m.arch
        if self.arch not in REFERENCE_ARCHS:
            raise ReferenceUnavailable(f"the reference code has no {self.arch}; choose one of {REFERENCE_ARCHS}")
        self.device, self.batch_size = device, batch_size
        self.use_bf16 = device.type == "cuda"
        torch.manual_seed(config.train.seed)
        encoder, predictor = init_model(device=device, patch_size=m.patch_size, model_name=self.arch,
                                        crop_size=m.image_size, pred_depth=m.pred_depth, pred_emb_dim=m.pred_dim)
        target = copy.deepcopy(encoder)
        ipe = max(1, (config.data.num_samples or 1_281_167) // config.train.batch_size)
        self.optimizer, self.scaler, self.scheduler, self.wd_scheduler = init_opt(
            encoder=encoder, predictor=predictor, wd=optim.weight_decay, final_wd=optim.final_weight_decay,
            start_lr=optim.start_lr, ref_lr=optim.lr, final_lr=optim.final_lr, iterations_per_epoch=ipe,
            warmup=optim.warmup_epochs, num_epochs=int(config.train.epochs), use_bfloat16=self.use_bf16)
        self.ddp = torch.distributed.is_available() and torch.distributed.is_initialized()
        if self.ddp:
            from torch.nn.parallel import DistributedDataParallel as DDP

            encoder = DDP(encoder, static_graph=True)
            predictor = DDP(predictor, static_graph=True)
            target = DDP(target)
        for p in target.parameters():
            p.requires_grad = False
        self.encoder, self.predictor, self.target = encoder, predictor, target
        self.num_params = sum(p.numel() for p in encoder.parameters()) + sum(p.numel() for p in predictor.parameters())
        self.momentum = config.optim.ema[0]

        collator = reference_collator(MaskCollator, config)
        self.masks = []
        for _ in range(num_batches):
            _, enc, pred = collator([torch.zeros(1) for _ in range(batch_size)])
            self.masks.append(([t.to(device) for t in enc], [t.to(device) for t in pred]))
        self.images = torch.randn(batch_size, 3, m.image_size, m.image_size, device=device)

    def lengths(self, i: int) -> tuple[list[int], list[int]]:
        """(context length per image, target length per block, s = m * B + b) of batch i."""
        enc, pred = self.masks[i % len(self.masks)]
        return [enc[0].shape[1]] * self.batch_size, [pred[0].shape[1]] * (len(pred) * self.batch_size)

    def step(self, i: int) -> float:
        masks_enc, masks_pred = self.masks[i % len(self.masks)]
        imgs, batch = self.images, self.batch_size
        self.scheduler.step()
        self.wd_scheduler.step()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16):
            with torch.no_grad():
                h = self.target(imgs)
                h = F.layer_norm(h, (h.size(-1),))
                h = self.apply_masks(h, masks_pred)
                h = self.repeat_interleave_batch(h, batch, repeat=len(masks_enc))
            z = self.predictor(self.encoder(imgs, masks_enc), masks_enc, masks_pred)
            loss = F.smooth_l1_loss(z, h)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.grad_logger(self.encoder.named_parameters())
        self.optimizer.zero_grad()
        with torch.no_grad():
            m = self.momentum
            for param_q, param_k in zip(self.encoder.parameters(), self.target.parameters()):
                param_k.data.mul_(m).add_((1.0 - m) * param_q.detach().data)
        return float(loss.detach())  # the reference's float(loss): a host sync every step
