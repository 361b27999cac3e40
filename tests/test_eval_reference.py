"""Reference I-JEPA checkpoints: a checkpoint built on the fly with the reference's key
names and shapes (its DDP ``module.`` prefixes, its optimizer entries) loads into our
models, computes what the reference's ViT computes, exports and evaluates."""

import json

import pytest
import torch
import torch.nn.functional as F

from scalejepa.eval.reference import load_reference_checkpoint, reference_encoder_state
from scalejepa.eval.weights import WeightsError, build_encoder_from, load_weights
from scalejepa.export import main as export_main

DIM, DEPTH, HEADS, HIDDEN, PATCH, GRID = 128, 4, 4, 512, 4, 8  # vit_micro at 32 px
PRED_DIM, PRED_DEPTH = 64, 2


def _block(prefix: str, dim: int, hidden: int, g: torch.Generator) -> dict:
    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.05

    return {
        f"{prefix}norm1.weight": 1 + r(dim), f"{prefix}norm1.bias": r(dim),
        f"{prefix}attn.qkv.weight": r(3 * dim, dim), f"{prefix}attn.qkv.bias": r(3 * dim),
        f"{prefix}attn.proj.weight": r(dim, dim), f"{prefix}attn.proj.bias": r(dim),
        f"{prefix}norm2.weight": 1 + r(dim), f"{prefix}norm2.bias": r(dim),
        f"{prefix}mlp.fc1.weight": r(hidden, dim), f"{prefix}mlp.fc1.bias": r(hidden),
        f"{prefix}mlp.fc2.weight": r(dim, hidden), f"{prefix}mlp.fc2.bias": r(dim),
    }


def reference_encoder(seed: int) -> dict:
    """Keys as the reference's DDP-wrapped VisionTransformer.state_dict() has them."""
    g = torch.Generator().manual_seed(seed)
    sd = {
        "module.pos_embed": torch.randn(1, GRID * GRID, DIM, generator=g),  # a frozen Parameter there
        "module.patch_embed.proj.weight": torch.randn(DIM, 3, PATCH, PATCH, generator=g) * 0.05,
        "module.patch_embed.proj.bias": torch.randn(DIM, generator=g) * 0.05,
    }
    for i in range(DEPTH):
        sd.update(_block(f"module.blocks.{i}.", DIM, HIDDEN, g))
    sd["module.norm.weight"], sd["module.norm.bias"] = torch.ones(DIM), torch.zeros(DIM)
    return sd


def reference_predictor(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    sd = {
        "module.predictor_embed.weight": torch.randn(PRED_DIM, DIM, generator=g) * 0.05,
        "module.predictor_embed.bias": torch.zeros(PRED_DIM),
        "module.mask_token": torch.randn(1, 1, PRED_DIM, generator=g) * 0.02,
        "module.predictor_pos_embed": torch.randn(1, GRID * GRID, PRED_DIM, generator=g),
        "module.predictor_norm.weight": torch.ones(PRED_DIM), "module.predictor_norm.bias": torch.zeros(PRED_DIM),
        "module.predictor_proj.weight": torch.randn(DIM, PRED_DIM, generator=g) * 0.05,
        "module.predictor_proj.bias": torch.zeros(DIM),
    }
    for i in range(PRED_DEPTH):
        sd.update(_block(f"module.predictor_blocks.{i}.", PRED_DIM, 4 * PRED_DIM, g))
    return sd


def reference_checkpoint() -> dict:
    """What the reference's save_checkpoint writes (src/train.py)."""
    encoder = reference_encoder(0)
    return {
        "encoder": encoder,
        "predictor": reference_predictor(1),
        "target_encoder": reference_encoder(2),
        "opt": {"state": {0: {"step": torch.tensor(10.0), "exp_avg": torch.zeros(3), "exp_avg_sq": torch.zeros(3)}},
                "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.04,
                                  "amsgrad": False, "params": [0]}]},
        "scaler": None,
        "epoch": 300,
        "loss": 0.123,
        "batch_size": 128,
        "world_size": 16,
        "lr": 1e-3,
    }


def reference_vit_forward(sd: dict, images: torch.Tensor) -> torch.Tensor:
    """The reference VisionTransformer's forward (timm-style), written out on its state dict."""
    p = {k.removeprefix("module."): v for k, v in sd.items()}
    x = F.conv2d(images, p["patch_embed.proj.weight"], p["patch_embed.proj.bias"], stride=PATCH)
    x = x.flatten(2).transpose(1, 2) + p["pos_embed"]
    batch, n, _ = x.shape
    for i in range(DEPTH):
        b = f"blocks.{i}."
        h = F.layer_norm(x, (DIM,), p[b + "norm1.weight"], p[b + "norm1.bias"], eps=1e-6)
        qkv = F.linear(h, p[b + "attn.qkv.weight"], p[b + "attn.qkv.bias"])
        q, k, v = qkv.reshape(batch, n, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * (DIM // HEADS) ** -0.5).softmax(-1)
        y = (attn @ v).transpose(1, 2).reshape(batch, n, DIM)
        x = x + F.linear(y, p[b + "attn.proj.weight"], p[b + "attn.proj.bias"])
        h = F.layer_norm(x, (DIM,), p[b + "norm2.weight"], p[b + "norm2.bias"], eps=1e-6)
        h = F.linear(F.gelu(F.linear(h, p[b + "mlp.fc1.weight"], p[b + "mlp.fc1.bias"])),
                     p[b + "mlp.fc2.weight"], p[b + "mlp.fc2.bias"])
        x = x + h
    return F.layer_norm(x, (DIM,), p["norm.weight"], p["norm.bias"], eps=1e-6)


@pytest.fixture
def checkpoint_path(tmp_path):
    path = tmp_path / "IN1K-vit.micro-ep300.pth.tar"
    torch.save(reference_checkpoint(), path)
    return path


def test_reference_checkpoint_loads_into_our_models(checkpoint_path):
    ckpt = torch.load(checkpoint_path, weights_only=True)
    model, target = load_reference_checkpoint(ckpt)
    assert model.encoder.embed_dim == DIM and len(model.predictor.predictor_blocks) == PRED_DEPTH
    assert model.predictor.pred_dim == PRED_DIM and model.predictor.predictor_blocks[0].attn.num_heads == HEADS
    for ours, entry in ((model.encoder, "encoder"), (model.predictor, "predictor"), (target, "target_encoder")):
        state = ours.state_dict()
        assert len(state) == len(ckpt[entry])
        for key, value in ckpt[entry].items():
            assert torch.equal(state[key.removeprefix("module.")], value), (entry, key)
    # Same computation as the reference's ViT, not only the same names.
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    expected = reference_vit_forward(ckpt["target_encoder"], images)
    torch.testing.assert_close(target.forward_features(images), expected, atol=1e-5, rtol=1e-4)


def test_reference_checkpoint_as_eval_weights_and_export(checkpoint_path, tmp_path, capsys):
    weights = load_weights(checkpoint_path)  # target encoder by default
    assert weights.spec.arch == "vit_micro" and weights.spec.image_size == 32 and "reference" in weights.source
    assert "epoch 300" in weights.source
    encoder = build_encoder_from(weights)
    ckpt = reference_checkpoint()
    assert torch.equal(encoder.blocks[1].mlp.fc1.weight, ckpt["target_encoder"]["module.blocks.1.mlp.fc1.weight"])
    context = load_weights(checkpoint_path, entry="encoder")
    assert torch.equal(context.state_dict["norm.bias"], ckpt["encoder"]["module.norm.bias"])

    out = tmp_path / "export" / "ijepa_micro.pt"
    assert export_main([str(checkpoint_path), "--out", str(out)]) == 0
    assert "exported vit_micro target encoder" in capsys.readouterr().out
    exported = torch.load(out, weights_only=True)
    assert not any(k.startswith("module.") for k in exported)
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["arch"] == "vit_micro" and sidecar["image_size"] == 32 and sidecar["patch_size"] == 4
    assert sidecar["entry"] == "target" and sidecar["depth"] == DEPTH
    again = load_weights(out)
    assert all(torch.equal(again.state_dict[k], v) for k, v in weights.state_dict.items())


def test_reference_checkpoint_errors(tmp_path):
    ckpt = reference_checkpoint()
    del ckpt["target_encoder"]["module.blocks.3.mlp.fc2.bias"]
    with pytest.raises(WeightsError, match="fc2.bias"):
        reference_encoder_state(ckpt)
    ckpt = reference_checkpoint()
    del ckpt["target_encoder"]
    path = tmp_path / "no_target.pth.tar"
    torch.save(ckpt, path)
    with pytest.raises(WeightsError, match="no 'target_encoder'"):
        load_weights(path)
    assert load_weights(path, entry="encoder").spec.arch == "vit_micro"
