"""Checkpoint conversion: per-format parity with the reference implementation, position
embedding resampling, parameter counts, bad input and the CLI.

Every reference is a random-weight model written in the exact on-disk layout of its format;
the oracle forward is timm's / Hugging Face's PyTorch code on the same input (NCHW there,
NHWC here). Parity bound: max abs difference <= 1e-4 in float32.
"""

import argparse
import json
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

timm = pytest.importorskip("timm", reason="timm is the parity oracle (pip install timm)")
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

from tome_jax import convert as C  # noqa: E402
from tome_jax.checkpoint import load_model  # noqa: E402
from tome_jax.cli.convert import main as convert_main  # noqa: E402
from tome_jax.vit import ViT  # noqa: E402

TOL = 1e-4
TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, mlp_ratio=2.0)
REPO = Path(__file__).resolve().parents[1]


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere (zero-initialised heads, tokens and biases included), scaled
    so activations stay O(1) and every parameter changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith(("norm1.weight", "norm2.weight", "norm.weight", "layernorm.weight")):
                p.copy_(1 + 0.1 * noise)
            elif p.ndim >= 2 and "token" not in name and "pos" not in name:
                p.copy_(noise / np.sqrt(p.shape[-1] if p.ndim == 2 else p[0].numel()))
            else:
                p.copy_(0.3 * noise)
    return model.eval()


def images(n: int = 2, size: int = 32, seed: int = 0) -> np.ndarray:
    """Random NCHW float32 images."""
    return np.random.RandomState(seed).randn(n, 3, size, size).astype(np.float32)


def torch_forward(model, x_nchw: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = model(torch.from_numpy(x_nchw))
    return getattr(out, "pooler_output", out).numpy()


def our_forward(params, config, x_nchw: np.ndarray, **overrides) -> np.ndarray:
    model = ViT(**{**config, **overrides})
    logits, _ = model.apply({"params": params}, x_nchw.transpose(0, 2, 3, 1))
    return np.asarray(logits)


def assert_parity(ours: np.ndarray, ref: np.ndarray, tol: float = TOL) -> float:
    assert ours.shape == ref.shape
    assert np.abs(ref).max() > 0.1, "degenerate reference output"
    diff = float(np.abs(ours - ref).max())
    assert diff <= tol, f"max abs diff {diff} > {tol}"
    print(f"PARITY max abs diff {diff:.2e}")
    return diff


def convert_file(path, **kw):
    params, config, _ = C.convert(path, **kw)
    return params, config


# --------------------------------------------------------------------------------------------
# timm / DeiT state dicts through timm's own save path.


def _tiny(name: str, **kw):
    """A registered timm model shrunk to TINY sizes (random init, nothing downloaded)."""
    return timm.create_model(name, pretrained=False, **{**TINY, **kw})


def _timm_models():
    return {
        "vit_tok": lambda: _tiny("vit_tiny_patch16_224", num_classes=10),
        "vit_no_qkv_bias": lambda: _tiny("vit_tiny_patch16_224", num_classes=10,
                                         qkv_bias=False),
        "vit_gap_fc_norm": lambda: _tiny("vit_tiny_patch16_224", num_classes=10,
                                         global_pool="avg"),
        "deit_distilled": lambda: _tiny("deit_tiny_distilled_patch16_224", num_classes=10),
        "dinov2_style_reg4": lambda: _tiny("vit_small_patch14_reg4_dinov2", patch_size=4,
                                           img_size=28, num_classes=0),
    }


@pytest.mark.parametrize("serialization", ["safetensors", "bin"])
@pytest.mark.parametrize("name", list(_timm_models()))
def test_timm_state_dict_parity(tmp_path, name, serialization):
    from timm.models import save_for_hf

    ref = randomize(_timm_models()[name]())
    save_for_hf(ref, tmp_path, safe_serialization=serialization == "safetensors")
    path = tmp_path / ("model.safetensors" if serialization == "safetensors"
                       else "pytorch_model.bin")
    params, config = convert_file(path, num_heads=2)
    size = 28 if "dinov2" in name else 32
    x = images(size=size)
    assert_parity(our_forward(params, config, x), torch_forward(ref, x))
    if name in ("deit_distilled", "dinov2_style_reg4"):
        # With merging on, the distill / register tokens are never merged: size 1, in place.
        extra = 1 if name == "deit_distilled" else 4
        _, out = ViT(**config, r=2).apply({"params": params}, x.transpose(0, 2, 3, 1))
        patches = (size // params["embedding"]["kernel"].shape[0]) ** 2
        assert out["encoded"].shape[1] == 1 + extra + patches - 2 * 2  # 2 blocks, r = 2
        np.testing.assert_array_equal(np.asarray(out["size"][:, 1:1 + extra]), 1)
    if name == "deit_distilled":
        assert config["distill_token"] and "head_dist" in params
    if name == "dinov2_style_reg4":
        assert config["num_registers"] == 4 and config["layerscale_init"] is not None
    if name == "vit_gap_fc_norm":
        assert config["pool"] == "mae"


def test_timm_vit_tiny_standard(tmp_path):
    """A registered timm model at 224 px: the variant is inferred as Ti/16."""
    ref = randomize(timm.create_model("vit_tiny_patch16_224", pretrained=False))
    path = tmp_path / "vit_tiny.pth"
    torch.save(ref.state_dict(), path)
    params, config = convert_file(path)
    assert config["variant"] == "Ti/16" and set(config) & {"width", "depth", "num_heads"} == set()
    x = images(n=1, size=224)
    diff = assert_parity(our_forward(params, config, x), torch_forward(ref, x))
    print(f"vit_tiny_patch16_224 max abs diff {diff:.2e}")


# --------------------------------------------------------------------------------------------
# MAE: {'model': state_dict} with MAE key names (its ViT is timm's, plus `fc_norm`).


def _mae_pretrain_state_dict(encoder: VisionTransformer) -> dict:
    """The MAE pretraining checkpoint: encoder keys plus the decoder and mask token."""
    sd = dict(encoder.state_dict())
    g = torch.Generator().manual_seed(1)
    extra = {"mask_token": (1, 1, 32), "decoder_embed.weight": (32, 64),
             "decoder_embed.bias": (32,), "decoder_pos_embed": (1, 17, 32),
             "decoder_blocks.0.norm1.weight": (32,), "decoder_norm.weight": (32,),
             "decoder_pred.weight": (192, 32), "decoder_pred.bias": (192,)}
    sd.update({k: torch.randn(s, generator=g) for k, s in extra.items()})
    return sd


@pytest.mark.parametrize("kind", ["global_pool", "cls_token", "pretrain"])
def test_mae_pth_parity(tmp_path, kind):
    if kind == "global_pool":  # MAE fine-tune: mean of patches -> fc_norm, no final norm
        ref = VisionTransformer(**TINY, num_classes=10, global_pool="avg", fc_norm=True)
    else:
        ref = VisionTransformer(**TINY, num_classes=0 if kind == "pretrain" else 10)
    randomize(ref)
    sd = _mae_pretrain_state_dict(ref) if kind == "pretrain" else ref.state_dict()
    assert all(k.startswith(("blocks.", "patch_embed.", "cls_token", "pos_embed", "norm",
                             "fc_norm", "head", "decoder", "mask_token")) for k in sd)
    assert ("blocks.0.attn.qkv.weight" in sd) and (("fc_norm.weight" in sd) == (
        kind == "global_pool")) and (("norm.weight" in sd) != (kind == "global_pool"))
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": sd, "args": argparse.Namespace(model="vit_tiny", lr=1e-3),
                "epoch": 99}, path)
    params, config = convert_file(path, num_heads=2)
    assert config["pool"] == {"global_pool": "mae", "cls_token": "tok", "pretrain": "tok"}[kind]
    x = images()
    assert_parity(our_forward(params, config, x), torch_forward(ref, x))


# --------------------------------------------------------------------------------------------
# AugReg / big_vision .npz, with timm's npz loader as the oracle.


def _jax_layout(sd: dict, prefix_names: dict) -> dict:
    """timm state dict -> flax arrays in big_vision's linen layout (no pos handling)."""
    w = {k: v.detach().numpy() for k, v in sd.items()}
    d = w["patch_embed.proj.weight"].shape[0]
    heads = 2
    out = {"embedding/kernel": w["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
           "embedding/bias": w["patch_embed.proj.bias"]}
    if "norm.weight" in w:
        out["Transformer/encoder_norm/scale"] = w["norm.weight"]
        out["Transformer/encoder_norm/bias"] = w["norm.bias"]
    if "head.weight" in w:
        out["head/kernel"], out["head/bias"] = w["head.weight"].T, w["head.bias"]
    mha, ln1, mlp = prefix_names["mha"], prefix_names["ln1"], prefix_names["mlp"]
    i = 0
    while f"blocks.{i}.norm1.weight" in w:
        b, p = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        out[b + "LayerNorm_0/scale"], out[b + "LayerNorm_0/bias"] = (w[p + "norm1.weight"],
                                                                     w[p + "norm1.bias"])
        out[b + f"{ln1}/scale"], out[b + f"{ln1}/bias"] = w[p + "norm2.weight"], w[p + "norm2.bias"]
        for j, n in enumerate(("query", "key", "value")):
            out[b + f"{mha}/{n}/kernel"] = w[p + "attn.qkv.weight"][j * d:(j + 1) * d].T.reshape(
                d, heads, -1)
            out[b + f"{mha}/{n}/bias"] = w[p + "attn.qkv.bias"][j * d:(j + 1) * d].reshape(
                heads, -1)
        out[b + f"{mha}/out/kernel"] = w[p + "attn.proj.weight"].T.reshape(heads, -1, d)
        out[b + f"{mha}/out/bias"] = w[p + "attn.proj.bias"]
        for r in range(2):
            out[b + f"{mlp}/Dense_{r}/kernel"] = w[p + f"mlp.fc{r + 1}.weight"].T
            out[b + f"{mlp}/Dense_{r}/bias"] = w[p + f"mlp.fc{r + 1}.bias"]
        i += 1
    return out


def write_augreg_npz(model: VisionTransformer, path: Path, pre_logits: bool = False) -> dict:
    """The vision_transformer (pre-linen) layout: posemb with a class slot under
    Transformer/posembed_input, MultiHeadDotProductAttention_1, LayerNorm_2, MlpBlock_3."""
    sd = model.state_dict()
    arrays = _jax_layout(sd, {"mha": "MultiHeadDotProductAttention_1", "ln1": "LayerNorm_2",
                              "mlp": "MlpBlock_3"})
    arrays["cls"] = sd["cls_token"].numpy()
    arrays["Transformer/posembed_input/pos_embedding"] = sd["pos_embed"].numpy()
    if pre_logits:
        rs = np.random.RandomState(3)
        arrays["pre_logits/kernel"] = rs.randn(64, 64).astype(np.float32) / 8
        arrays["pre_logits/bias"] = rs.randn(64).astype(np.float32) / 8
    np.savez(path, **arrays)
    return arrays


def write_big_vision_npz(model: VisionTransformer, path: Path, scan: bool) -> None:
    """big_vision: linen names, top-level patch-only `pos_embedding`, `params/` prefix,
    optionally the scan-stacked `Transformer/encoderblock/...` layout."""
    sd = model.state_dict()
    arrays = _jax_layout(sd, {"mha": "MultiHeadDotProductAttention_0", "ln1": "LayerNorm_1",
                              "mlp": "MlpBlock_0"})
    if "cls_token" in sd:
        arrays["cls"] = sd["cls_token"].numpy()
    arrays["pos_embedding"] = sd["pos_embed"].numpy()
    if scan:
        blocks = sorted(k for k in arrays if k.startswith("Transformer/encoderblock_0/"))
        for k in blocks:
            tail = k.split("/", 2)[2]
            keys = [f"Transformer/encoderblock_{i}/{tail}" for i in range(len(model.blocks))]
            arrays[f"Transformer/encoderblock/{tail}"] = np.stack([arrays.pop(q) for q in keys])
    np.savez(path, **{f"params/{k}": v for k, v in arrays.items()})


def timm_from_npz(model: VisionTransformer, path: Path) -> VisionTransformer:
    """The oracle: a fresh timm model filled by timm's own .npz loader."""
    from timm.models.vision_transformer import _load_weights

    randomize(model, seed=123)  # anything the loader misses stays visibly wrong
    _load_weights(model, str(path))
    return model.eval()


def test_augreg_npz_parity(tmp_path):
    path = tmp_path / "augreg.npz"
    write_augreg_npz(randomize(VisionTransformer(**TINY, num_classes=10)), path)
    oracle = timm_from_npz(VisionTransformer(**TINY, num_classes=10), path)
    params, config = convert_file(path)
    assert "Transformer" in params and config["pool"] == "tok"
    x = images()
    assert_parity(our_forward(params, config, x), torch_forward(oracle, x))


@pytest.mark.parametrize("pool", ["tok", "gap"])
@pytest.mark.parametrize("scan", [False, True])
def test_big_vision_npz_parity(tmp_path, scan, pool):
    if pool == "tok":  # the class token takes no position embedding, as in big_vision
        make = lambda: VisionTransformer(**TINY, num_classes=10, no_embed_class=True)  # noqa
    else:  # final norm, then the mean of the patch tokens
        make = lambda: VisionTransformer(**TINY, num_classes=10, class_token=False,  # noqa
                                         global_pool="avg", fc_norm=False)
    path = tmp_path / "bv.npz"
    write_big_vision_npz(randomize(make()), path, scan=scan)
    oracle = timm_from_npz(make(), path)
    params, config = convert_file(path)
    assert config["pool"] == pool and config["depth"] == 2
    x = images()
    assert_parity(our_forward(params, config, x), torch_forward(oracle, x))


def test_npz_pre_logits_and_head_reinit(tmp_path):
    path = tmp_path / "augreg.npz"
    arrays = write_augreg_npz(randomize(VisionTransformer(**TINY, num_classes=10)), path,
                              pre_logits=True)
    params, config = convert_file(path)
    assert config["representation_size"] == 64
    x = images()
    logits, out = ViT(**config).apply({"params": params}, x.transpose(0, 2, 3, 1))
    cls = np.asarray(out["encoded"][:, 0])
    expect = np.tanh(cls @ arrays["pre_logits/kernel"] + arrays["pre_logits/bias"])
    expect = expect @ arrays["head/kernel"] + arrays["head/bias"]
    np.testing.assert_allclose(np.asarray(logits), expect, atol=TOL)
    with pytest.warns(UserWarning, match="10 classes, model 5"):
        params5, config5 = convert_file(path, num_classes=5)
    assert config5["num_classes"] == 5 and params5["head"]["kernel"].shape == (64, 5)
    assert not params5["head"]["kernel"].any()
    np.testing.assert_array_equal(params5["pre_logits"]["kernel"], arrays["pre_logits/kernel"])
    params0, config0 = convert_file(path, num_classes=0)
    assert "head" not in params0 and config0["num_classes"] == 0


# --------------------------------------------------------------------------------------------
# Hugging Face Dinov2Model layout (random weights), with position embedding interpolation.


@pytest.mark.parametrize("size", [56, 42, 70])
def test_hf_dinov2_parity(tmp_path, size):
    transformers = pytest.importorskip(
        "transformers", reason="the HF Dinov2 oracle needs `transformers`")
    cfg = transformers.Dinov2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=128, image_size=56, patch_size=14,
                                    layerscale_value=0.5)
    ref = randomize(transformers.Dinov2Model(cfg))
    ref.save_pretrained(tmp_path / "hf")
    params, config = convert_file(tmp_path / "hf" / "model.safetensors", num_heads=2,
                                  image_size=size)
    assert config["layerscale_init"] is not None
    assert params["pos_embedding"].shape == (1, (size // 14) ** 2, 64)
    x = images(size=size)
    assert_parity(our_forward(params, config, x), torch_forward(ref, x))


# --------------------------------------------------------------------------------------------
# Position-embedding resampling on its own.


@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize("old,new", [((4, 4), (6, 6)), ((7, 7), (3, 3)), ((5, 3), (8, 10)),
                                     ((37, 37), (16, 16)), ((14, 14), (24, 24))])
def test_resample_bicubic_matches_torch(old, new, antialias):
    grid = np.random.RandomState(0).randn(*old, 5).astype(np.float32)
    method = "bicubic_antialias" if antialias else "bicubic"
    ours = C.resample_grid(grid, new, method)
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(grid).permute(2, 0, 1)[None], size=new, mode="bicubic",
        align_corners=False, antialias=antialias)[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-5)


@pytest.mark.parametrize("old,new", [((14, 14), (24, 24)), ((24, 24), (14, 14)),
                                     ((4, 6), (7, 3))])
def test_resample_linear_matches_scipy_zoom(old, new):
    """vit_jax / big_vision resample with scipy.ndimage.zoom(order=1)."""
    scipy_ndimage = pytest.importorskip("scipy.ndimage")
    grid = np.random.RandomState(1).randn(*old, 4)
    zoom = (new[0] / old[0], new[1] / old[1], 1)
    ref = scipy_ndimage.zoom(grid, zoom, order=1)
    assert ref.shape[:2] == new
    np.testing.assert_allclose(C.resample_grid(grid, new, "linear"), ref, atol=1e-10)


def test_resample_posemb_properties():
    pos = np.random.RandomState(2).randn(1, 16, 3).astype(np.float32)
    np.testing.assert_array_equal(C.resample_posemb(pos, (4, 4)), pos)  # identity size
    const = np.ones((1, 9, 2), np.float32)  # rows sum to one: constants are preserved
    for method in C.RESAMPLE_METHODS:
        np.testing.assert_allclose(C.resample_posemb(const, (5, 7), method=method),
                                   np.ones((1, 35, 2)), atol=1e-6)
    assert not np.allclose(C.resample_posemb(pos, (6, 6), method="linear"),
                           C.resample_posemb(pos, (6, 6), method="bicubic"))
    with pytest.raises(ValueError, match="unknown resample method"):
        C.resample_posemb(pos, (6, 6), method="nearest")
    with pytest.raises(C.CheckpointError, match="grid"):
        C.resample_posemb(pos[:, :15], (6, 6))


def test_convert_resamples_timm_checkpoint_like_timm(tmp_path):
    """224 -> 384-style upsizing (here 32 -> 48 px): timm's checkpoint_filter_fn resamples
    with antialiased bicubic; ours with method="bicubic_antialias" must agree."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    src = randomize(VisionTransformer(**TINY, num_classes=10))
    path = tmp_path / "vit.pth"
    torch.save(src.state_dict(), path)
    big = VisionTransformer(**{**TINY, "img_size": 48}, num_classes=10).eval()
    big.load_state_dict(checkpoint_filter_fn(src.state_dict(), big))
    params, config = convert_file(path, num_heads=2, image_size=48,
                                  resample="bicubic_antialias")
    x = images(size=48)
    assert_parity(our_forward(params, config, x), torch_forward(big, x))


# --------------------------------------------------------------------------------------------
# Parameter counts.


def _timm_count(name: str, **kw) -> int:
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, **kw)
    return sum(p.numel() for p in model.parameters())


def _our_count(size: int = 224, **kw) -> int:
    return sum(int(np.prod(s)) for s in C.model_shapes(kw, (size, size)).values())


@pytest.mark.parametrize("variant,timm_name,ours", [
    ("Ti/16", "vit_tiny_patch16_224", 5_717_224),
    ("S/16", "vit_small_patch16_224", 22_050_280),
    ("B/16", "vit_base_patch16_224", 86_566_888),
    ("B/32", "vit_base_patch32_224", 88_223_464),
    ("L/16", "vit_large_patch16_224", 304_325_608),
])
def test_parameter_counts(variant, timm_name, ours):
    """Ours folds the class token's position embedding into `cls`: timm's count minus width."""
    count = _our_count(variant=variant, num_classes=1000)
    assert count == ours
    width = C.model_shapes({"variant": variant}, (224, 224))["cls"][-1]
    assert count == _timm_count(timm_name) - width


def test_parameter_count_b16_matches_issue():
    assert _timm_count("vit_base_patch16_224") == 86_567_656  # the figure in the issue
    assert _our_count(variant="B/16", num_classes=1000) == 86_567_656 - 768


def test_parameter_counts_deit_distilled_and_dinov2():
    deit = _our_count(variant="B/16", num_classes=1000, distill_token=True)
    assert deit == _timm_count("deit_base_distilled_patch16_224") - 2 * 768
    dino = _our_count(518, variant="S/14", num_classes=0, layerscale_init=1.0)
    assert dino == _timm_count("vit_small_patch14_dinov2") - 384
    reg = _our_count(518, variant="S/14", num_classes=0, layerscale_init=1.0, num_registers=4)
    assert reg == _timm_count("vit_small_patch14_reg4_dinov2")  # registers take no posemb


# --------------------------------------------------------------------------------------------
# Bad input, safety, atomic output, CLI.


@pytest.fixture
def tiny_checkpoint(tmp_path):
    ref = randomize(VisionTransformer(**TINY, num_classes=10))
    path = tmp_path / "tiny.safetensors"
    from safetensors.torch import save_file

    save_file(ref.state_dict(), str(path))
    return path, ref


def test_wrong_format_is_refused(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("definitely not a checkpoint\n")
    with pytest.raises(C.CheckpointError, match="unknown checkpoint format"):
        C.convert(text)
    other = tmp_path / "other.npz"
    np.savez(other, weights=np.zeros(3))
    with pytest.raises(C.CheckpointError, match="not a ViT .npz"):
        C.convert(other)
    sd = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(8, 3, 7, 7), "fc.weight": torch.zeros(10, 8)}, sd)
    with pytest.raises(C.CheckpointError, match="unsupported keys"):
        C.convert(sd)
    with pytest.raises(C.CheckpointError, match="no such file"):
        C.convert(tmp_path / "missing.pth")


def test_shape_mismatch_names_first_key_and_shapes(tiny_checkpoint):
    path, _ = tiny_checkpoint
    with pytest.raises(C.CheckpointError) as e:
        C.convert(path, variant="Ti/8")
    msg = str(e.value)
    assert "'embedding/kernel'" in msg and "(8, 8, 3, 64)" in msg and "(8, 8, 3, 192)" in msg
    with pytest.raises(C.CheckpointError, match=r"embedding/kernel.*\(8, 8, 3, 64\).*16, 16"):
        C.convert(path, variant="mu/16", num_heads=2)


@pytest.mark.parametrize("fmt", ["safetensors", "pth", "npz", "pth_legacy"])
def test_truncated_file_is_refused(tmp_path, fmt):
    ref = randomize(VisionTransformer(**TINY, num_classes=10))
    path = tmp_path / f"ckpt.{fmt}"
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(ref.state_dict(), str(path))
    elif fmt == "npz":
        write_augreg_npz(ref, path)
    else:
        torch.save(ref.state_dict(), path, _use_new_zipfile_serialization=fmt == "pth")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    dst = tmp_path / "out"
    with pytest.raises(C.CheckpointError):
        C.convert(path, dst)
    assert not dst.exists() and [p.name for p in tmp_path.iterdir()] == [path.name]


class _Evil:
    """Unpickling this would create a marker file."""

    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("how", ["torch_zip", "torch_legacy", "raw_pickle"])
def test_malicious_pickle_is_refused_without_running(tmp_path, how):
    marker = tmp_path / "pwned"
    evil = _Evil()
    evil.marker = str(marker)
    path = tmp_path / "evil.pth"
    payload = {"model": {"cls_token": torch.zeros(1, 1, 4)}, "args": evil}
    if how == "raw_pickle":
        path.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, path, _use_new_zipfile_serialization=how == "torch_zip")
    assert not marker.exists()
    with pytest.raises(C.CheckpointError, match="refused or unreadable"):
        C.convert(path, tmp_path / "out")
    assert not marker.exists(), "unpickling ran code"
    assert not (tmp_path / "out").exists()
    # Control: the same payload really does run code when unpickled unsafely.
    pickle.loads(pickle.dumps(evil)).close()
    assert marker.exists()


def test_destination_is_atomic_and_loadable(tmp_path, tiny_checkpoint):
    path, ref = tiny_checkpoint
    dst = tmp_path / "converted"
    C.convert(path, dst, num_heads=2)
    assert sorted(p.name for p in dst.iterdir()) == [C.CONFIG_FILE, C.PARAMS_FILE]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left
    model, params, info = load_model(dst)
    assert info.normalization == "imagenet" and info.image_size == (32, 32)
    x = images()
    logits, _ = model.apply({"params": params}, x.transpose(0, 2, 3, 1))
    assert_parity(np.asarray(logits), torch_forward(ref, x))
    merged = load_model(dst, r=2)[0]  # ToMe on at load time
    assert merged.r == 2 and merged.apply({"params": params}, x.transpose(0, 2, 3, 1))[
        1]["encoded"].shape[1] == 17 - 2 * 2
    with pytest.raises(FileExistsError):
        C.convert(path, dst)
    # A failure while writing leaves nothing behind.
    bad = tmp_path / "bad"
    with pytest.raises(C.CheckpointError):
        C.convert(path, bad, variant="Ti/8")
    assert not bad.exists()


def test_save_failure_midway_leaves_nothing(tmp_path, tiny_checkpoint, monkeypatch):
    path, _ = tiny_checkpoint
    dst = tmp_path / "half"

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(json, "dumps", boom)  # fails after params were written to temp
    with pytest.raises(OSError, match="disk full"):
        C.convert(path, dst, num_heads=2)
    assert not dst.exists()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_cli_main_in_process(tmp_path, tiny_checkpoint, capsys):
    path, _ = tiny_checkpoint
    dst = tmp_path / "cli"
    assert convert_main([str(path), str(dst), "--num-classes", "3", "--num-heads", "2",
                         "--image-size", "48"]) == 0
    model, params, _ = load_model(dst)
    assert model.num_classes == 3 and params["pos_embedding"].shape == (1, 36, 64)
    capsys.readouterr()
    assert convert_main([str(path), str(tmp_path / "bad"), "--variant", "B/16"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(
        f"python -m tome_jax.convert: error: {path}: shape mismatch")
    assert err.count("\n") == 1
    assert not (tmp_path / "bad").exists()


def test_cli_module_subprocess(tmp_path, tiny_checkpoint):
    path, _ = tiny_checkpoint
    dst = tmp_path / "sub"
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    res = subprocess.run([sys.executable, "-m", "tome_jax.convert", str(path), str(dst),
                          "--num-heads", "2"], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=120)
    assert res.returncode == 0, res.stderr
    assert (dst / C.PARAMS_FILE).is_file() and (dst / C.CONFIG_FILE).is_file()


def test_jit_forward_of_converted_params(tiny_checkpoint):
    """The converted tree is a plain pytree usable under jit."""
    path, ref = tiny_checkpoint
    params, config = convert_file(path, num_heads=2)
    model = ViT(**config)
    x = images()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = jax.jit(lambda p, im: model.apply({"params": p}, im)[0])(
            params, x.transpose(0, 2, 3, 1))
    assert_parity(np.asarray(out), torch_forward(ref, x))


def test_normalization_recorded_per_source_and_overridable(tmp_path, tiny_checkpoint, capsys):
    """.npz weights expect AugReg's [-1, 1] inputs, PyTorch ones ImageNet mean/std."""
    path, ref = tiny_checkpoint
    C.convert(path, tmp_path / "torch", num_heads=2)
    assert load_model(tmp_path / "torch")[2].normalization == "imagenet"
    npz = tmp_path / "augreg.npz"
    write_augreg_npz(ref, npz)
    C.convert(npz, tmp_path / "npz")
    assert load_model(tmp_path / "npz")[2].normalization == "augreg"
    assert convert_main([str(path), str(tmp_path / "cli"), "--num-heads", "2",
                         "--normalization", "unit"]) == 0
    assert json.loads(capsys.readouterr().out)["normalization"] == "unit"
    assert load_model(tmp_path / "cli")[2].normalization == "unit"
    with pytest.raises(ValueError, match="unknown normalization 'bogus'"):
        C.convert(path, tmp_path / "bogus", num_heads=2, normalization="bogus")
    assert not (tmp_path / "bogus").exists()
