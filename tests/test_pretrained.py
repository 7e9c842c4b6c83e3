"""Pretrained ViTs by Hub name, offline: small random-weight models written by timm and
transformers themselves are laid out in a Hugging Face cache the way huggingface_hub stores
downloads (HF_HOME/hub/models--ORG--NAME/{blobs, snapshots/COMMIT, refs/main}), HF_HUB_OFFLINE
is set, and `load_pretrained` must reproduce the writer's own forward pass: logits, or pooled
features for headless models, to 1e-4 in float32.
"""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

timm = pytest.importorskip("timm", reason="timm is the parity oracle (pip install timm)")
transformers = pytest.importorskip("transformers", reason="transformers is the parity oracle")
pytest.importorskip("huggingface_hub", reason="the Hub cache is read by huggingface_hub")
from timm.models import save_for_hf  # noqa: E402

from tome_jax import convert as C  # noqa: E402
from tome_jax import hub  # noqa: E402
from tome_jax.checkpoint import CheckpointError, load_model  # noqa: E402
from tome_jax.normalization import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from tome_jax.pretrained_models import (  # noqa: E402
    PREPROCESSING_FILE,
    convert_pretrained,
    load_pretrained,
    read_preprocessing,
)

TOL = 1e-4
COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    """An empty Hugging Face home, read offline."""
    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


def cache_repo(home: Path, repo_id: str, folder: Path, commit: str = COMMIT) -> None:
    """Puts folder's files into the Hub cache as a download of repo_id at commit: content in
    blobs/, relative symlinks in snapshots/COMMIT/, the commit in refs/main."""
    repo = home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for file in sorted(folder.iterdir()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere (zero-initialised heads, tokens and biases included), scaled
    so activations stay O(1) and every parameter changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim == 1 and name.endswith("weight") and "norm" in name:
                p.copy_(1 + 0.1 * noise)
            elif p.ndim >= 2 and "token" not in name and "pos" not in name:
                p.copy_(noise / np.sqrt(p.shape[-1] if p.ndim == 2 else p[0].numel()))
            else:
                p.copy_(0.3 * noise)
    return model.eval()


def images(size: int, n: int = 2, seed: int = 0) -> np.ndarray:
    """Random NCHW float32 inputs (already normalized: the models' own input)."""
    return np.random.RandomState(seed).randn(n, 3, size, size).astype(np.float32)


def ours(model, params, x_nchw: np.ndarray):
    logits, out = model.apply({"params": params}, x_nchw.transpose(0, 2, 3, 1))
    return np.asarray(logits), out


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    assert np.abs(b).max() > 0.1, "degenerate reference output"
    return float(np.abs(a - b).max())


# --------------------------------------------------------------------------------------------
# timm repositories: config.json with "architecture" + "pretrained_cfg", timm state dicts.

TINY = dict(img_size=32, patch_size=8, depth=2)


def _timm_cases():
    """name -> (timm factory, input size, expected normalization, serialization)."""
    return {
        # Ti width: the head count is the variant's, as for a real repo without model_args.
        "vit_augreg": (lambda: timm.create_model(
            "vit_tiny_patch16_224.augreg_in21k_ft_in1k", pretrained=False, mlp_ratio=1.0,
            num_classes=10, **TINY), 32, "augreg", "safetensors"),
        "deit_distilled_bin": (lambda: timm.create_model(
            "deit_tiny_distilled_patch16_224", pretrained=False, mlp_ratio=1.0, num_classes=10,
            **TINY), 32, "imagenet", "bin"),
        "vit_mae_headless": (lambda: timm.create_model(
            "vit_base_patch16_224.mae", pretrained=False, embed_dim=64, num_heads=2,
            num_classes=0, **TINY), 32, "imagenet", "safetensors"),
        "vit_avg_fc_norm": (lambda: timm.create_model(
            "vit_tiny_patch16_224", pretrained=False, mlp_ratio=1.0, num_classes=10,
            global_pool="avg", **TINY), 32, "augreg", "safetensors"),
        "vit_avg_no_fc_norm": (lambda: timm.create_model(
            "vit_tiny_patch16_224", pretrained=False, mlp_ratio=1.0, num_classes=10,
            global_pool="avg", fc_norm=False, **TINY), 32, "augreg", "safetensors"),
        "dinov2": (lambda: timm.create_model(
            "vit_small_patch14_dinov2.lvd142m", pretrained=False, img_size=28, patch_size=4,
            embed_dim=64, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=0),
            28, "imagenet", "safetensors"),
        "dinov2_reg4": (lambda: timm.create_model(
            "vit_small_patch14_reg4_dinov2.lvd142m", pretrained=False, img_size=28,
            patch_size=4, embed_dim=64, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=0),
            28, "imagenet", "safetensors"),
    }


@pytest.mark.parametrize("case", list(_timm_cases()))
def test_timm_repo_parity(tmp_path, hf_home, case):
    make, size, normalization, serialization = _timm_cases()[case]
    ref = randomize(make())
    save_for_hf(ref, tmp_path / "repo", safe_serialization=serialization == "safetensors")
    repo_id = f"timm/{case}"
    cache_repo(hf_home, repo_id, tmp_path / "repo")
    model, params, info = load_pretrained(repo_id)
    x = images(size)
    with torch.no_grad():
        expect = ref(torch.from_numpy(x)).numpy()
    logits, _ = ours(model, params, x)
    diff = max_diff(logits, expect)
    print(f"PARITY timm {case}: max |diff| {diff:.2e}")
    assert diff <= TOL
    assert info.normalization == normalization and info.image_size == (size, size)
    assert info.source == f"hf-hub:{repo_id}@{COMMIT}"
    if case == "vit_augreg":
        assert info.config["variant"] == "Ti/8" and "num_heads" not in info.config
    if case == "dinov2_reg4":
        assert info.config["num_registers"] == 4 and info.config["layerscale_init"] is not None
    if case == "deit_distilled_bin":
        assert info.config["distill_token"]
    assert info.config["pool"] == {"vit_avg_fc_norm": "mae", "vit_avg_no_fc_norm": "gap"}.get(
        case, "tok")


def test_timm_repo_at_another_size_resamples_like_timm(tmp_path, hf_home):
    """image_size= resamples position embeddings as timm does when it loads a checkpoint into
    a model of another size (bicubic with antialiasing), downsampling 7x7 -> 5x5 here."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    make, *_ = _timm_cases()["dinov2"]
    ref = randomize(make())
    save_for_hf(ref, tmp_path / "repo", safe_serialization=True)
    cache_repo(hf_home, "timm/dinov2", tmp_path / "repo")
    model, params, info = load_pretrained("timm/dinov2", image_size=20)
    small = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=20,
                              patch_size=4, embed_dim=64, depth=2, num_heads=2, mlp_ratio=2.0,
                              num_classes=0).eval()
    small.load_state_dict(checkpoint_filter_fn(ref.state_dict(), small))
    x = images(20)
    with torch.no_grad():
        expect = small(torch.from_numpy(x)).numpy()
    diff = max_diff(ours(model, params, x)[0], expect)
    print(f"PARITY timm dinov2 resampled 28 -> 20 px: max |diff| {diff:.2e}")
    assert diff <= TOL and info.image_size == (20, 20)


# --------------------------------------------------------------------------------------------
# transformers repositories: config.json with "model_type", Hub (save_pretrained) naming,
# preprocessing from preprocessor_config.json written by the model's own image processor.

def _vit_config(**kw):
    return transformers.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=128, image_size=32, patch_size=8, **kw)


def _mae_config():
    return transformers.ViTMAEConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
        image_size=32, patch_size=8, decoder_hidden_size=32, decoder_num_hidden_layers=1,
        decoder_num_attention_heads=2, decoder_intermediate_size=64)


def _dinov2_kw():
    return dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=128, image_size=56, patch_size=14, layerscale_value=0.5)


def _vit_processor(mean=None, std=None):
    kw = {} if mean is None else dict(image_mean=list(mean), image_std=list(std))
    return transformers.ViTImageProcessor(size={"height": 32, "width": 32}, **kw)


def _bit_processor():
    # facebook/dinov2-*: resize the short side to 256, centre crop 224 (here 48 -> 42), while
    # the weights' position grid is for 518 px (here 56): the converter resamples it.
    return transformers.BitImageProcessor(
        size={"shortest_edge": 48}, crop_size={"height": 42, "width": 42},
        image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD))


def _mae_forward(encoder, x):
    """ViTMAE's encoder with nothing masked and tokens in input order (identity noise)."""
    encoder.config.mask_ratio = 0.0
    noise = torch.arange(encoder.embeddings.patch_embeddings.num_patches, dtype=torch.float32)
    out = encoder(x, noise=noise.expand(x.shape[0], -1))
    return out.last_hidden_state[:, 0], out.last_hidden_state


def _hf_cases():
    """name -> (model factory, processor, forward -> (output, sequence or None), input size,
    expected normalization, expected config entries)."""
    seq = lambda m, x: (m(x).pooler_output, m(x).last_hidden_state)  # noqa: E731
    return {
        "ViTForImageClassification": (
            lambda: transformers.ViTForImageClassification(_vit_config(num_labels=5)),
            _vit_processor(), lambda m, x: (m(x).logits, None), 32, "augreg",
            {"num_classes": 5, "pool": "tok"}),
        "ViTModel_pooler": (
            lambda: transformers.ViTModel(_vit_config()), _vit_processor(), seq, 32, "augreg",
            {"num_classes": 0, "representation_size": 64}),
        "ViTModel_no_qkv_bias_tanh_gelu": (
            lambda: transformers.ViTModel(_vit_config(qkv_bias=False,
                                                      hidden_act="gelu_pytorch_tanh"),
                                          add_pooling_layer=False),
            _vit_processor(IMAGENET_MEAN, IMAGENET_STD),
            lambda m, x: (m(x).last_hidden_state[:, 0], m(x).last_hidden_state), 32,
            "imagenet", {"approximate_gelu": True, "representation_size": None}),
        "ViTMAEModel": (
            lambda: transformers.ViTMAEModel(_mae_config()),
            _vit_processor(IMAGENET_MEAN, IMAGENET_STD), _mae_forward, 32, "imagenet",
            {"num_classes": 0}),
        "ViTMAEForPreTraining": (  # facebook/vit-mae-*: encoder under vit., plus the decoder
            lambda: transformers.ViTMAEForPreTraining(_mae_config()),
            _vit_processor(IMAGENET_MEAN, IMAGENET_STD), lambda m, x: _mae_forward(m.vit, x),
            32, "imagenet", {"num_classes": 0}),
        "Dinov2Model": (
            lambda: transformers.Dinov2Model(transformers.Dinov2Config(**_dinov2_kw())),
            _bit_processor(), seq, 42, "imagenet", {"layerscale_init": 1.0}),
        "Dinov2WithRegistersModel": (
            lambda: transformers.Dinov2WithRegistersModel(
                transformers.Dinov2WithRegistersConfig(**_dinov2_kw(), num_register_tokens=4)),
            _bit_processor(), seq, 42, "imagenet", {"num_registers": 4}),
    }


@pytest.mark.parametrize("case", list(_hf_cases()))
def test_transformers_repo_parity(tmp_path, hf_home, case):
    make, processor, forward, size, normalization, expect_config = _hf_cases()[case]
    ref = randomize(make())
    ref.save_pretrained(tmp_path / "repo")
    processor.save_pretrained(tmp_path / "repo")
    repo_id = f"org/{case}"
    cache_repo(hf_home, repo_id, tmp_path / "repo")
    model, params, info = load_pretrained(repo_id)
    x = images(size)
    with torch.no_grad():
        expect, expect_seq = (None if t is None else t.numpy()
                              for t in forward(ref, torch.from_numpy(x)))
    logits, out = ours(model, params, x)
    diff = max_diff(logits, expect)
    if expect_seq is not None:  # every token, not only the pooled one
        diff = max(diff, max_diff(np.asarray(out["encoded"]), expect_seq))
    print(f"PARITY transformers {case}: max |diff| {diff:.2e}")
    assert diff <= TOL
    assert info.normalization == normalization and info.image_size == (size, size)
    for key, value in expect_config.items():
        assert info.config[key] == value, key


def test_hf_vit_file_converts_through_convert(tmp_path):
    """A bare ViTForImageClassification safetensors file (no repo) converts too."""
    ref = randomize(transformers.ViTForImageClassification(_vit_config(num_labels=5)))
    ref.save_pretrained(tmp_path / "hf")
    params, config, _ = C.convert(tmp_path / "hf" / "model.safetensors", num_heads=2)
    from tome_jax.vit import ViT

    x = images(32)
    with torch.no_grad():
        expect = ref(torch.from_numpy(x)).logits.numpy()
    logits, _ = ours(ViT(**config), params, x)
    assert max_diff(logits, expect) <= TOL


# --------------------------------------------------------------------------------------------
# Model directories, merging, preprocessing records.


def _cache_dinov2(tmp_path, hf_home, repo_id="facebook/dinov2-tiny-test"):
    ref = randomize(transformers.Dinov2Model(transformers.Dinov2Config(**_dinov2_kw())))
    ref.save_pretrained(tmp_path / "repo")
    _bit_processor().save_pretrained(tmp_path / "repo")
    cache_repo(hf_home, repo_id, tmp_path / "repo")
    return ref, repo_id


def test_convert_pretrained_writes_a_model_directory(tmp_path, hf_home):
    ref, repo_id = _cache_dinov2(tmp_path, hf_home)
    dst = tmp_path / "models" / "dino"
    info = convert_pretrained(repo_id, dst)
    assert info.normalization == "imagenet" and info.image_size == (42, 42)
    assert info.source == f"hf-hub:{repo_id}@{COMMIT}"
    prep = read_preprocessing(dst)
    assert prep.crop_pct == pytest.approx(42 / 48) and prep.interpolation == "bicubic"
    assert prep.mean == pytest.approx(IMAGENET_MEAN) and prep.image_size == (42, 42)
    assert json.loads((dst / PREPROCESSING_FILE).read_text())["normalization"] == "imagenet"
    model, params, loaded = load_model(dst, r=2)
    assert loaded == info
    x = images(42)
    with torch.no_grad():
        expect = ref(torch.from_numpy(x)).pooler_output.numpy()
    logits, _ = ours(model.clone(r=0), params, x)
    assert max_diff(logits, expect) <= TOL
    _, out = ours(model, params, x)  # r=2 over 2 blocks: 1 + 9 - 4 tokens
    assert out["encoded"].shape[1] == 1 + 9 - 4
    with pytest.raises(FileExistsError, match="exists"):
        convert_pretrained(repo_id, dst)
    assert sorted(p.name for p in dst.parent.iterdir()) == ["dino"]  # no staging left behind


def test_convert_cli_takes_a_hub_name(tmp_path, hf_home, capsys):
    """`python -m tome_jax.convert ORG/NAME DST` converts a Hub repo; file-only flags refused."""
    from tome_jax.cli import convert as cli

    _, repo_id = _cache_dinov2(tmp_path, hf_home)
    dst = tmp_path / "dino"
    assert cli.main([repo_id, str(dst)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["normalization"] == "imagenet" and printed["image_size"] == [42, 42]
    assert load_model(dst)[2].source == f"hf-hub:{repo_id}@{COMMIT}"
    assert cli.main([repo_id, str(tmp_path / "other"), "--pool", "gap"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "convert: error:" in err and "--pool" in err


def test_load_pretrained_overrides(tmp_path, hf_home):
    _, repo_id = _cache_dinov2(tmp_path, hf_home)
    model, params, info = load_pretrained(repo_id, r=3, strategy="prune", image_size=56,
                                          num_classes=7)
    assert (model.r, model.strategy, model.num_classes) == (3, "prune", 7)
    assert info.image_size == (56, 56) and params["pos_embedding"].shape == (1, 16, 64)
    assert "r" not in info.config and params["head"]["kernel"].shape == (64, 7)


# --------------------------------------------------------------------------------------------
# Errors: one line each, saying what to do.


def _one_line(excinfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text
    return text


def _cache_config(tmp_path, hf_home, repo_id, config: dict) -> None:
    folder = tmp_path / repo_id.replace("/", "_")
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(b"\x08\0\0\0\0\0\0\0{}      ")
    cache_repo(hf_home, repo_id, folder)


@pytest.mark.parametrize("config,match", [
    ({"model_type": "bert", "architectures": ["BertModel"]},
     r"acme/repo: unsupported transformers model \(model_type 'bert'"),
    ({"model_type": "dinov2", "architectures": ["Dinov2ForImageClassification"]},
     r"Dinov2ForImageClassification"),
    ({"architecture": "resnet50", "pretrained_cfg": {}},
     r"acme/repo: timm architecture 'resnet50' is not a supported ViT"),
    ({"hello": 1}, r"acme/repo: unknown repository layout"),
])
def test_unknown_layout_is_one_line(tmp_path, hf_home, config, match):
    _cache_config(tmp_path, hf_home, "acme/repo", config)
    with pytest.raises(CheckpointError, match=match) as e:
        load_pretrained("acme/repo")
    _one_line(e)


def test_not_cached_offline_says_how_to_fetch(hf_home):
    with pytest.raises(hub.HubError) as e:
        load_pretrained("google/vit-base-patch16-224")
    text = _one_line(e)
    assert "google/vit-base-patch16-224" in text and "not in the Hugging Face cache" in text
    assert "HF_HUB_OFFLINE" in text and "hf download google/vit-base-patch16-224" in text


def test_weights_not_cached_offline(tmp_path, hf_home):
    folder = tmp_path / "repo"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "vit"}))
    cache_repo(hf_home, "org/config-only", folder)
    with pytest.raises(hub.HubError, match="neither model.safetensors nor pytorch_model.bin"
                                           ".*not in the Hugging Face cache") as e:
        load_pretrained("org/config-only")
    _one_line(e)


def test_unknown_normalization_is_refused(tmp_path, hf_home):
    ref = randomize(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3,
                                      **TINY))
    clip_mean = (0.48145466, 0.4578275, 0.40821073)
    save_for_hf(ref, tmp_path / "repo", safe_serialization=True,
                data_config={"mean": clip_mean, "std": (0.26862954, 0.26130258, 0.27577711)})
    cache_repo(hf_home, "timm/clip_norm", tmp_path / "repo")
    with pytest.raises(CheckpointError, match=r"timm/clip_norm: input normalization mean "
                                              r"\[0.4814.* is none of") as e:
        load_pretrained("timm/clip_norm")
    _one_line(e)
    _, _, info = load_pretrained("timm/clip_norm", normalization="imagenet")
    assert info.normalization == "imagenet"


def test_missing_huggingface_hub(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(hub.HubError, match="pip install huggingface_hub") as e:
        load_pretrained("timm/vit_base_patch16_224.augreg2_in21k_ft_in1k")
    _one_line(e)


def test_names(monkeypatch):
    assert hub.split_name("hf-hub:timm/vit_base_patch16_224.mae") == (
        "timm/vit_base_patch16_224.mae", None)
    assert hub.split_name("facebook/dinov2-small@v1.0") == ("facebook/dinov2-small", "v1.0")
    for bad in ("vit_base", "a/b/c", "/abs/path.npz", ""):
        with pytest.raises(hub.HubError, match="not a Hugging Face Hub model name"):
            hub.split_name(bad)
    assert hub.is_repo_name("facebook/dinov2-small")
    monkeypatch.chdir(REPO)
    assert not hub.is_repo_name("tests/conftest.py")  # an existing path is a path
    assert not hub.is_repo_name("weights.npz")


def test_import_does_not_load_huggingface_hub():
    code = ("import sys, tome_jax.pretrained_models; "
            "assert 'huggingface_hub' not in sys.modules, 'imported eagerly'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO,
                   env={**os.environ, "JAX_PLATFORMS": "cpu"})
