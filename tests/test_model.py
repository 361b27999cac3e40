import pytest
import torch

from scalejepa.config import MaskConfig, ModelConfig
from scalejepa.ijepa import build_models, compute_targets
from scalejepa.masks import MaskGenerator, mask_rng
from scalejepa.models.layers import Seqs
from scalejepa.models.layers.attention import attend
from scalejepa.models.predictor import Predictor
from scalejepa.models.vit import VIT_SIZES, TokenSelection, VisionTransformer, count_parameters

# The facts table's counts (DeiT/timm convention) include a 1000-class linear head.
TABLE = {"vit_tiny": 5.7e6, "vit_small": 22e6, "vit_base": 86e6, "vit_large": 304e6, "vit_huge": 632e6,
         "vit_giant": 1.0e9}


@pytest.mark.parametrize("arch", list(TABLE))
def test_parameter_counts_match_the_table(arch):
    with torch.device("meta"):
        encoder = VisionTransformer(arch, 224, 14 if arch == "vit_huge" else 16)
    head = VIT_SIZES[arch].embed_dim * 1000 + 1000
    assert abs(count_parameters(encoder) + head - TABLE[arch]) / TABLE[arch] < 0.02


def test_predictor_parameter_count():
    with torch.device("meta"):
        predictor = Predictor(num_patches=256, embed_dim=1280, pred_dim=384, depth=12, num_heads=16)
    assert abs(count_parameters(predictor) - 22e6) / 22e6 < 0.02
    assert predictor.predictor_blocks[0].attn.num_heads == 16  # head dim 24, as the reference's ViT-H


def test_meta_init_then_materialise():
    eager = VisionTransformer("vit_micro", 32, 4)
    with torch.device("meta"):
        lazy = VisionTransformer("vit_micro", 32, 4)
    lazy.to_empty(device="cpu")
    lazy.init_weights()
    assert torch.equal(lazy.pos_embed, eager.pos_embed)
    for name, tensor in lazy.state_dict().items():
        if name.endswith("norm1.weight") or name.endswith("norm.weight"):
            assert torch.all(tensor == 1), name
        elif name.endswith(".bias"):
            assert torch.all(tensor == 0), name
        elif name.endswith("qkv.weight") or name.endswith("fc1.weight"):
            assert abs(tensor.std().item() - 0.02) < 0.002, name


def test_evaluation_api_shapes():
    encoder = VisionTransformer("vit_micro", 32, 4)
    images = torch.randn(3, 3, 32, 32)
    assert encoder.forward_features(images).shape == (3, 64, 128)
    assert encoder.forward_pooled(images).shape == (3, 128)
    assert encoder.forward_pooled(images, last_n=4).shape == (3, 512)
    last = encoder.forward_features(images).mean(1)
    assert torch.allclose(encoder.forward_pooled(images), last, atol=1e-6)


def test_packed_sequences_do_not_leak_into_each_other():
    torch.manual_seed(0)
    encoder = VisionTransformer("vit_micro", 32, 4).eval()
    images = torch.randn(3, 3, 32, 32)
    keep_idx = [torch.tensor([0, 5, 9]), torch.arange(10, 40), torch.tensor([63])]
    packed = encoder(images, TokenSelection(torch.cat(keep_idx), Seqs.from_lengths([3, 30, 1])))
    rows = 0
    for b, idx in enumerate(keep_idx):
        alone = encoder(images[b : b + 1], TokenSelection(idx, Seqs.from_lengths([len(idx)])))
        assert torch.allclose(packed[rows : rows + len(idx)], alone, atol=1e-5)
        rows += len(idx)


@pytest.mark.parametrize("impl,sdpa_backend", [("flex", "auto"), ("eager", "auto"), ("sdpa_nested", "auto"),
                                               ("sdpa", "flash"), ("sdpa", "math"), ("sdpa_nested", "math")])
def test_attention_implementations_agree_on_mixed_lengths(impl, sdpa_backend):
    torch.manual_seed(0)
    seqs = Seqs.from_lengths([1, 7, 30, 2])
    q, k, v = (torch.randn(40, 2, 16, requires_grad=impl != "flex") for _ in range(3))  # flex: no CPU backward
    got, want = attend(q, k, v, seqs, impl, sdpa_backend), attend(q, k, v, seqs, "sdpa")
    assert torch.allclose(got, want, atol=1e-5)
    if impl != "flex":
        grad = torch.randn_like(got)
        for a, b in zip(torch.autograd.grad(got, (q, k, v), grad), torch.autograd.grad(want, (q, k, v), grad)):
            assert torch.allclose(a, b, atol=1e-5)


def test_a_pinned_sdpa_backend_is_the_one_that_runs():
    seqs = Seqs.from_lengths([3, 5])
    q = torch.randn(8, 2, 16)
    for backend, op in (("math", "aten::_scaled_dot_product_attention_math"),
                        ("flash", "aten::_scaled_dot_product_flash_attention_for_cpu")):
        with torch.profiler.profile() as prof:
            attend(q, q, q, seqs, "sdpa", backend)
        assert op in {e.name for e in prof.events()}, backend


@pytest.mark.parametrize("context", ["truncate", "pack"])
def test_ijepa_loss_and_gradients(context):
    torch.manual_seed(0)
    model_config = ModelConfig(arch="vit_micro", image_size=32, patch_size=4, pred_depth=2, pred_dim=64)
    model, target = build_models(model_config)
    masks = MaskGenerator(8, MaskConfig(context=context, min_keep=4))(4, mask_rng(0, 0, 0, 0))
    images = torch.randn(4, 3, 32, 32)
    targets = compute_targets(target, images, masks)
    assert targets.shape == (masks.target_tokens, 128) and not targets.requires_grad
    loss = model(images, masks, targets)
    loss.backward()
    assert loss.item() > 0
    assert all(p.grad is not None for p in model.parameters())
    assert all(p.grad is None for p in target.parameters())


def test_targets_are_layer_normed_target_features():
    model_config = ModelConfig(arch="vit_micro", image_size=32, patch_size=4, pred_depth=1, pred_dim=64)
    _, target = build_models(model_config)
    masks = MaskGenerator(8, MaskConfig(min_keep=4))(2, mask_rng(0, 0, 0, 0))
    images = torch.randn(2, 3, 32, 32)
    targets = compute_targets(target, images, masks)
    features = torch.nn.functional.layer_norm(target.forward_features(images), (128,))
    seq_of = torch.repeat_interleave(torch.arange(masks.target_seqs.num_seqs),
                                     masks.target_seqs.cu_seqlens.diff().long())
    expected = features[seq_of % 2, masks.target_index]
    assert torch.allclose(targets, expected, atol=1e-5)


def _loss_and_grads(impl, context, state=None, gather_impl="auto"):
    torch.manual_seed(0)
    config = ModelConfig(arch="vit_micro", image_size=32, patch_size=4, pred_depth=1, pred_dim=64, attn_impl=impl,
                         gather_impl=gather_impl)
    model, target = build_models(config)
    if state is not None:
        model.load_state_dict(state[0])
        target.load_state_dict(state[1])
    masks = MaskGenerator(8, MaskConfig(context=context, min_keep=4))(3, mask_rng(0, 0, 0, 1))
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    loss = model(images, masks, compute_targets(target, images, masks))
    return model, target, loss


@pytest.mark.parametrize("context", ["truncate", "pack"])
def test_all_attention_implementations_give_the_same_loss(context):
    with torch.no_grad():  # FlexAttention has no backward on CPU
        model, target, loss = _loss_and_grads("sdpa", context)
        state = (model.state_dict(), target.state_dict())
        for impl in ("flex", "triton", "sdpa_nested"):
            _, _, other = _loss_and_grads(impl, context, state)
            assert torch.allclose(other, loss, atol=1e-5), impl


def test_a_training_step_with_triton_equals_sdpa():
    results = {}
    for impl in ("sdpa", "triton"):
        model, _, loss = _loss_and_grads(impl, "pack")
        loss.backward()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        optimizer.step()
        results[impl] = (loss.detach(), {n: p.detach().clone() for n, p in model.named_parameters()})
    assert torch.allclose(results["sdpa"][0], results["triton"][0], atol=1e-5)
    for name, value in results["sdpa"][1].items():
        assert torch.allclose(value, results["triton"][1][name], atol=1e-5), name


@pytest.mark.parametrize("attn_impl, gather_impl", [("sdpa", "triton"), ("triton", "torch")])
def test_gather_kernels_and_attention_are_chosen_apart(attn_impl, gather_impl):
    """Triton gathers under SDPA attention, and Triton attention on PyTorch gathers, train
    as the all-PyTorch path does (loss and gradients)."""
    model, target, loss = _loss_and_grads("sdpa", "pack", gather_impl="torch")
    loss.backward()
    state = (model.state_dict(), target.state_dict())
    other, _, other_loss = _loss_and_grads(attn_impl, "pack", state, gather_impl=gather_impl)
    other_loss.backward()
    assert (other.encoder.gather_impl, other.predictor.gather_impl) == (gather_impl, gather_impl)
    assert other.encoder.blocks[0].attn.attn_impl == attn_impl
    assert torch.allclose(other_loss, loss, atol=1e-5)
    for (name, p), q in zip(model.named_parameters(), other.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-5), name


def test_triton_gathers_on_cpu_need_the_interpreter(monkeypatch):
    from scalejepa.config import ConfigError, load_config
    from scalejepa.parallel.build import check_device_support

    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ConfigError, match="model.gather_impl=triton on CPU needs the Triton interpreter"):
        check_device_support(load_config("debug_cpu", ["model.gather_impl=triton"]), torch.device("cpu"))
    check_device_support(load_config("debug_cpu", ["model.gather_impl=torch"]), torch.device("cpu"))


@pytest.mark.parametrize("overrides,message", [
    (["model.attn_impl=torch_varlen"], "model.attn_impl=torch_varlen runs FlashAttention's CUDA kernel only"),
    (["model.sdpa_backend=cudnn"], "model.sdpa_backend=cudnn has no CPU kernel"),
    (["model.attn_impl=flex"], "model.attn_impl=flex cannot train on CPU"),
])
def test_attention_paths_without_a_cpu_kernel_are_refused_before_building(overrides, message):
    from scalejepa.config import ConfigError, load_config
    from scalejepa.parallel.build import check_device_support

    with pytest.raises(ConfigError, match=message):
        check_device_support(load_config("debug_cpu", overrides), torch.device("cpu"))


def test_the_engine_declares_how_its_optimizer_and_ema_run():
    """The reference recipe is configuration (torch's default AdamW, the per-parameter EMA
    loop), and the engine says what it runs: benchmarks read it instead of its internals."""
    from scalejepa.config import load_config
    from scalejepa.dist_env import DistEnv
    from scalejepa.parallel import build_engine

    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    default = build_engine(load_config("debug_cpu", ["model.pred_depth=1"]), env)
    assert default.implementation == {"optimizer": "AdamW (torch default: foreach on CUDA)", "ema": "foreach lerp"}
    reference = build_engine(load_config("debug_cpu", ["model.pred_depth=1", "optim.implementation=foreach",
                                                       "optim.ema_impl=loop"]), env)
    assert reference.implementation["ema"] == "per-parameter loop"
