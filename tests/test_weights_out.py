"""``scalejepa-export --format pt|safetensors|hf|timm``: each layout loads in its real library
(transformers, timm, torch.hub) with our features, round trips are bit-identical, a
reference checkpoint converts to the published Hugging Face key layout, and every export
directory carries a model card. Models are tiny and local: nothing touches the network."""

import json
import logging
import re
import shutil
import warnings

import numpy as np
import pytest
import torch
from _distributed import REPO, checkpoint, reference
from PIL import Image
from test_eval_reference import DIM, reference_encoder, reference_predictor

from scalejepa.data.pipeline import normalize
from scalejepa.data.transforms import decode_center_crop
from scalejepa.eval.spec import OFFICIAL_LICENCE, WeightsError
from scalejepa.eval.weights import build_encoder_from, load_weights
from scalejepa.export import FORMATS, export, main

FEATURE_ATOL = 1e-5  # fp32, average-pooled last_hidden_state against our forward_pooled


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The session's one-process reference run (6 steps, checkpoints at 3 and 6), copied so
    that a probe result can be added for the model card."""
    copy = tmp_path_factory.mktemp("export_run") / "run"
    shutil.copytree(reference(tmp_path_factory), copy)
    probe = {"protocol": "linear", "entry": "target", "step": 6, "top1": 81.25, "gain_top1": 2.5,
             "random_init_baseline": {"top1": 78.75}}
    (copy / "eval_linear.json").write_text(json.dumps(probe))
    return copy


@pytest.fixture(scope="module")
def exports(run, tmp_path_factory):
    folder = tmp_path_factory.mktemp("exports")
    return {fmt: export(run, folder / fmt, fmt)[0] for fmt in FORMATS}


def images(n: int = 3, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def our_features(source) -> torch.Tensor:
    with torch.no_grad():
        return build_encoder_from(load_weights(source)).forward_pooled(images())


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records = []

    def emit(self, record):
        self.records.append(record)


def test_hf_export_loads_in_transformers_with_no_warning_and_our_features(run, exports):
    transformers = pytest.importorskip("transformers")
    handler = _Records()
    logging.getLogger("transformers").addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model, info = transformers.IJepaModel.from_pretrained(exports["hf"], output_loading_info=True)
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert info == {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(), "error_msgs": []}
    assert not [str(w.message) for w in caught] and not [r.getMessage() for r in handler.records]
    config = json.loads((exports["hf"] / "config.json").read_text())
    assert (config["layer_norm_eps"], config["qkv_bias"], config["num_attention_heads"]) == (1e-6, True, 4)
    with torch.no_grad():
        theirs = model.eval()(pixel_values=images()).last_hidden_state.mean(1)
    assert (theirs - our_features(run)).abs().max() <= FEATURE_ATOL


def test_hf_preprocessor_is_our_evaluation_transform(exports, tmp_path):
    """ImageNet mean/std, short-side resize and centre crop: the same pixels as scalejepa-eval
    (with Pillow, as ours; transformers' torchvision processor, its default where torchvision
    imports, rounds some pixels one intensity level apart)."""
    transformers = pytest.importorskip("transformers")
    processor = transformers.AutoImageProcessor.from_pretrained(exports["hf"], use_fast=False)
    pixels = np.random.default_rng(0).integers(0, 256, (50, 41, 3), dtype=np.uint8)  # not square
    path = tmp_path / "image.png"
    Image.fromarray(pixels).save(path)
    theirs = processor(Image.open(path), return_tensors="pt")["pixel_values"]
    crop = torch.from_numpy(decode_center_crop(path.read_bytes(), 32).copy()).permute(2, 0, 1).unsqueeze(0)
    ours = normalize(crop, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert theirs.shape == ours.shape == (1, 3, 32, 32)
    assert (theirs - ours).abs().max() <= 1e-5


def _import_timm():
    try:
        import timm
    except Exception as exc:  # noqa: BLE001 - e.g. RuntimeError from a torchvision built for another torch
        pytest.skip(f"timm does not import here ({type(exc).__name__}: {exc}); see README, Weights in and out")
    return timm


def test_timm_export_loads_strictly_in_timm_with_our_features(run, exports):
    timm = _import_timm()
    model = timm.create_model(f"local-dir:{exports['timm']}", pretrained=True).eval()  # strict by default
    config = json.loads((exports["timm"] / "config.json").read_text())
    assert (config["global_pool"], config["num_features"], config["model_args"]["class_token"]) == ("avg", 128, False)
    with torch.no_grad():
        theirs = model(images())
    assert theirs.shape == (3, 128) and (theirs - our_features(run)).abs().max() <= FEATURE_ATOL
    data = timm.data.resolve_data_config(model=model)
    assert data["interpolation"] == "bilinear" and data["input_size"] == (3, 32, 32)
    resize = timm.data.create_transform(**data).transforms[0]
    assert resize.size == 37  # scalejepa.data.transforms.eval_resize(32): the evaluation transform's


def test_round_trips_are_bit_identical(run, exports, tmp_path):
    """ours -> each format -> ours gives the same tensors and spec; and a second export
    from an export gives the same files' tensors."""
    original = load_weights(run)
    for fmt, folder in exports.items():
        back = load_weights(folder)
        assert back.spec == original.spec, fmt
        assert back.state_dict.keys() == original.state_dict.keys(), fmt
        assert all(torch.equal(back.state_dict[k], v) for k, v in original.state_dict.items()), fmt
        assert back.step == 6, fmt
    again, _ = export(exports["hf"], tmp_path / "hf_again", "timm")
    assert all(torch.equal(load_weights(again).state_dict[k], v) for k, v in original.state_dict.items())


def test_hf_model_from_pretrained_round_trips_through_save_pretrained(exports, tmp_path):
    """A directory written by transformers itself reads back to the same tensors."""
    transformers = pytest.importorskip("transformers")
    transformers.IJepaModel.from_pretrained(exports["hf"]).save_pretrained(tmp_path / "saved")
    ours, saved = load_weights(exports["hf"]), load_weights(tmp_path / "saved")
    assert all(torch.equal(saved.state_dict[k], v) for k, v in ours.state_dict.items())


# The published conversion's renames (transformers' models/ijepa/convert_ijepa_to_hf.py),
# applied to the reference checkpoint's names, then its q/k/v split of attn.qkv.
PUBLISHED_RENAMES = [
    (r"^pos_embed$", "embeddings.position_embeddings"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embeddings.projection."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layer.\1.layernorm_before."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layer.\1.attention.output.dense."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layer.\1.layernorm_after."),
    (r"^blocks\.(\d+)\.mlp\.fc1\.", r"encoder.layer.\1.intermediate.dense."),
    (r"^blocks\.(\d+)\.mlp\.fc2\.", r"encoder.layer.\1.output.dense."),
    (r"^norm\.", "layernorm."),
]


def published_conversion(encoder: dict) -> dict:
    out = {}
    for key, value in ((k.removeprefix("module."), v) for k, v in encoder.items()):
        match = re.match(r"^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$", key)
        if match:
            layer, kind = match.groups()
            for i, name in enumerate(("query", "key", "value")):
                out[f"encoder.layer.{layer}.attention.attention.{name}.{kind}"] = value[i * DIM:(i + 1) * DIM]
            continue
        for pattern, replacement in PUBLISHED_RENAMES:
            key = re.sub(pattern, replacement, key)
        out[key] = value
    return out


def test_reference_checkpoint_to_hf_matches_the_published_conversion(tmp_path, capsys):
    from safetensors.torch import load_file

    source = tmp_path / "IN1K-vit.micro-300e.pth.tar"
    encoder = reference_encoder(1)
    torch.save({"encoder": encoder, "predictor": reference_predictor(2), "target_encoder": reference_encoder(3),
                "opt": {}, "epoch": 300}, source)
    assert main([str(source), "--format", "hf", "--entry", "encoder", "--out", str(tmp_path / "hf")]) == 0
    assert "as hf" in capsys.readouterr().out
    ours, want = load_file(tmp_path / "hf" / "model.safetensors"), published_conversion(encoder)
    assert ours.keys() == want.keys()
    assert all(torch.equal(ours[k], v) for k, v in want.items())
    card = (tmp_path / "hf" / "README.md").read_text()
    assert f"license: {OFFICIAL_LICENCE}" in card and "the context encoder" in card and "epoch 300" in card
    assert load_weights(tmp_path / "hf").licence == OFFICIAL_LICENCE  # carried on by later exports and runs


def test_model_card_describes_the_run(exports):
    """The card, and the same provenance in the safetensors metadata's sidecar."""
    from scalejepa.formats.safetensors_file import read_safetensors

    _, meta = read_safetensors(exports["safetensors"] / "model.safetensors")
    assert (meta["arch"], meta["entry"], meta["step"], meta["num_heads"]) == ("vit_micro", "target", 6, 4)
    facts = meta["provenance"]
    assert (facts["preset"], facts["images_seen"], facts["data"]) == ("debug_cpu", 48, "synthetic images (data.synthetic)")
    assert facts["probes"]["eval_linear.json"]["top1"] == 81.25
    card = (exports["timm"] / "README.md").read_text()
    assert card.startswith("---\nlicense: other\nlibrary_name: timm\n")
    for text in ("vit_micro: width 128, depth 4, 4 heads", "the target encoder", "| Preset | `debug_cpu` |",
                 "step 6, 48 images seen (global batch 8)", "synthetic images",
                 "| eval_linear.json | linear | target | 6 | 81.25 | 78.75 | 2.5 |", f"local-dir:{exports['timm']}"):
        assert text in card, text


def test_torch_hub_loads_an_export_and_a_preset_from_the_local_checkout(run, exports):
    encoder = torch.hub.load(str(REPO), "encoder", weights=str(exports["hf"]), source="local")
    with torch.no_grad():
        assert torch.equal(encoder.forward_pooled(images()), our_features(run))
    fresh = torch.hub.load(str(REPO), "encoder", preset="small_cpu", source="local")
    assert (fresh.arch, fresh.embed_dim, len(fresh.blocks)) == ("custom", 96, 2)
    with pytest.raises(ValueError, match="one of preset"):
        torch.hub.load(str(REPO), "encoder", source="local")


def test_export_errors_leave_nothing_behind(run, exports, tmp_path, capsys):
    assert main([str(run), "--format", "hf", "--out", str(tmp_path / "x.pt")]) == 2
    assert "writes a directory" in capsys.readouterr().err
    assert main([str(run), "--format", "hf", "--out", str(exports["pt"])]) == 1  # never over another export
    assert "not an empty directory" in capsys.readouterr().err
    assert sorted(p.name for p in exports["pt"].iterdir()) == ["README.md", "model.json", "model.pt"]
    bogus = tmp_path / "notes.pth.tar"
    bogus.write_text("not weights")
    with pytest.raises(WeightsError, match="tried safetensors .* and torch.load"):
        load_weights(bogus)
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="none of the directories scalejepa reads; tried a run directory"):
        load_weights(tmp_path / "empty")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_an_hf_config_that_differs_from_our_encoders_is_refused(exports, tmp_path):
    folder = tmp_path / "eps"
    shutil.copytree(exports["hf"], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "layer_norm_eps": 1e-12}))
    with pytest.raises(WeightsError, match="layer_norm_eps=1e-12"):
        load_weights(folder)


def test_exports_of_a_checkpoint_step(run, tmp_path):
    path, meta = export(checkpoint(run, 3), tmp_path / "step3", "safetensors", entry="encoder")
    assert meta["step"] == 3 and meta["entry"] == "encoder" and load_weights(path).step == 3
