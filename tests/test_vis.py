"""Merge visualisation: groups from sources, mean-colour painting, the figure, bad input."""

from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import pytest
from PIL import Image

from tome_jax import vis
from tome_jax.checkpoint import load_model, save_model
from tome_jax.cli import vis as cli
from tome_jax.vit import ViT

TINY = dict(variant="S/8", depth=2, width=32, num_heads=2, mlp_dim=64, num_classes=10)
PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample-100"


@pytest.fixture(scope="module")
def tiny():
    """A random tiny ViT (8x8 patches of 8 px at 64 px) and a smooth random uint8 image."""
    model = ViT(**TINY)
    x = np.zeros((1, 64, 64, 3), np.float32)
    params = jax.jit(model.init)(jax.random.key(0), x)["params"]
    rng = np.random.default_rng(0)
    # Blocky colours so neighbouring patches are similar and groups are not all singletons.
    image = np.kron(rng.integers(0, 256, (4, 4, 3)), np.ones((16, 16, 1))).astype(np.uint8)
    image = (image.astype(int) + rng.integers(-20, 21, image.shape)).clip(0, 255)
    return model, params, image.astype(np.uint8)


def test_patch_groups_from_a_hand_made_source():
    # cls + 2x2 patches; final tokens: cls, {p0, p3}, {p1}, {p2}, in a scrambled order.
    source = np.array([[1, 0, 0, 0, 0],
                       [0, 0, 1, 0, 0],
                       [0, 1, 0, 0, 1],
                       [0, 0, 0, 1, 0]], np.float32)
    labels = vis.patch_groups(source, num_prefix=1, grid_hw=(2, 2))
    np.testing.assert_array_equal(labels, [[0, 1], [2, 0]])  # ids by first appearance
    with pytest.raises(vis.VisError, match="prefix"):
        vis.patch_groups(source, num_prefix=1, grid_hw=(3, 3))
    twice = source.copy()
    twice[3, 1] = 1  # p0 in two tokens
    with pytest.raises(vis.VisError, match="partition"):
        vis.patch_groups(twice, num_prefix=1, grid_hw=(2, 2))
    pruned = source[[0, 2, 3]]  # the token holding p1 dropped
    np.testing.assert_array_equal(vis.patch_groups(pruned, 1, (2, 2)), [[0, -1], [1, 0]])


def test_pruned_patches_are_painted_as_dropped(tiny):
    model, params, image = tiny
    model = model.clone(strategy="prune")
    (source,) = vis.merge_sources(model, params, vis.normalize(image)[None], r=6)
    labels = vis.patch_groups(source[0], 1, (8, 8))
    assert (labels < 0).sum() == 12 and vis._title("r = 6", 53, labels).endswith("12 dropped")
    panel = vis.paint_groups(image, labels, border=None)
    dropped = vis.upsample_labels(labels, (64, 64)) < 0
    assert (panel[dropped] == vis.DROPPED).all()
    # Kept patches are single tokens (pruning merges nothing): their own mean colour.
    keep = np.where(labels.ravel() >= 0, np.arange(64), -1).reshape(8, 8)
    np.testing.assert_array_equal(panel, vis.paint_groups(image, keep, border=None))


def test_painted_groups_carry_the_mean_colour_of_their_pixels(tiny):
    model, params, image = tiny
    (source,) = vis.merge_sources(model, params, vis.normalize(image)[None], r=12)
    _, tokens = model.clone(r=12).token_schedule(64)
    assert source.shape == (1, tokens[-1], 65)
    labels = vis.patch_groups(source[0], model.num_prefix_tokens, (8, 8))
    assert labels.max() + 1 == tokens[-1] - 1  # every non-cls token is one group
    assert labels.max() + 1 < 64  # something merged
    painted = vis.paint_groups(image, labels, border=None)
    assert painted.shape == image.shape and painted.dtype == np.uint8
    pixel_labels = vis.upsample_labels(labels, (64, 64))
    for g in range(labels.max() + 1):
        mask = pixel_labels == g
        want = np.rint(image[mask].astype(np.float64).mean(axis=0))
        np.testing.assert_array_equal(painted[mask], np.broadcast_to(want, painted[mask].shape))
    bordered = vis.paint_groups(image, labels)
    edges = vis.group_borders(pixel_labels)
    assert edges.any() and (bordered[edges] == vis.BORDER).all()
    assert (bordered[~edges] == painted[~edges]).all()


def test_prefix_tokens_are_left_out_of_the_groups():
    # Distill + 2 register tokens beside the class token (DeiT / DINOv2-with-registers layout).
    model = ViT(**{**TINY, "depth": 1}, distill_token=True, num_registers=2)
    image = np.random.default_rng(1).integers(0, 256, (32, 32, 3)).astype(np.uint8)
    params = jax.jit(model.init)(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))
    (source,) = vis.merge_sources(model, params["params"], vis.normalize(image)[None], r=3)
    assert source.shape == (1, 4 + 16 - 3, 4 + 16)
    np.testing.assert_array_equal(source[0, :4, :4], np.eye(4))  # prefix tokens untouched
    labels = vis.patch_groups(source[0], model.num_prefix_tokens, (4, 4))
    assert labels.min() == 0 and labels.max() + 1 == 16 - 3


def test_per_layer_sources_refine_into_coarser_groups(tiny):
    model, params, image = tiny
    x = vis.normalize(image)[None]
    sources = vis.merge_sources(model, params, x, r=6, per_layer=True)
    _, tokens = model.clone(r=6).token_schedule(64)
    assert [s.shape[1] for s in sources] == tokens[1:]
    np.testing.assert_array_equal(sources[-1], vis.merge_sources(model, params, x, r=6)[0])
    for fine, coarse in zip(sources, sources[1:], strict=False):
        # Merging only joins groups: each earlier group lies inside one later group.
        fine_l = vis.patch_groups(fine[0], 1, (8, 8)).ravel()
        coarse_l = vis.patch_groups(coarse[0], 1, (8, 8)).ravel()
        for g in np.unique(fine_l):
            assert len(np.unique(coarse_l[fine_l == g])) == 1


def test_grid_png_size_and_titles(tiny, tmp_path):
    model, params, image = tiny
    rows = vis.visualise(model, params, image, [0, 12])
    assert [t for t, _ in rows[0]] == ["original", "r = 0: 65 tokens", "r = 12: 41 tokens"]
    # r = 0: nothing merged, every patch is its own group (its own mean colour).
    np.testing.assert_array_equal(
        rows[0][1][1], vis.paint_groups(image, np.arange(64).reshape(8, 8)))
    path = vis.render_grid(rows, tmp_path / "grid.png", panel_inches=2.0, dpi=50)
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == (3 * 100, round(2.3 * 50))
    layered = vis.visualise(model, params, image, [8], layers=[1, 2])
    assert [t for t, _ in layered[0]] == ["original", "r = 8, block 1: 57 tokens",
                                          "r = 8, block 2: 49 tokens"]
    with pytest.raises(vis.VisError, match="outside"):
        vis.visualise(model, params, image, [4], layers=[3])


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA"])
def test_non_rgb_images_are_converted_with_a_note(tmp_path, mode):
    path = tmp_path / f"img_{mode}.png"
    Image.new("RGB", (40, 30), (200, 10, 10)).convert(mode).save(path)
    image, note = vis.load_image(path, 16)
    assert image.shape == (16, 16, 3) and image.dtype == np.uint8
    assert note and mode in note and path.name in note


def test_rgb_image_keeps_aspect_with_a_centre_crop(tmp_path):
    img = np.zeros((20, 40, 3), np.uint8)
    img[:, 10:30] = 255  # a white centre band, half the width
    Image.fromarray(img).save(tmp_path / "wide.png")
    out, note = vis.load_image(tmp_path / "wide.png", 20)
    assert note is None and out.shape == (20, 20, 3)
    assert out[:, 3:17].min() > 200  # the crop is the band, not the whole squashed image


def test_exif_orientation_is_applied(tmp_path):
    img = np.zeros((20, 40, 3), np.uint8)
    img[:, :20] = 255  # left half white; EXIF orientation 6 shows it rotated 90 degrees CW
    pil = Image.fromarray(img)
    exif = pil.getexif()
    exif[0x0112] = 6
    pil.save(tmp_path / "phone.jpg", exif=exif)
    out, _ = vis.load_image(tmp_path / "phone.jpg", 20)
    assert out[:8].min() > 200 and out[-8:].max() < 50  # white on top, as a viewer shows it


def test_undecodable_and_missing_images_name_the_file(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8not really a jpeg")
    with pytest.raises(vis.VisError, match="broken.jpg"):
        vis.load_image(bad, 32)
    with pytest.raises(vis.VisError, match="not found.*nope.png"):
        vis.load_image(tmp_path / "nope.png", 32)


def test_models_without_source_tracking_are_refused(tiny):
    class Plain(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(2)(x.reshape(x.shape[0], -1)), {}

    with pytest.raises(vis.VisError, match="Plain does not support source tracking"):
        vis.check_traceable(Plain())
    with pytest.raises(vis.VisError, match="normalization"):
        vis.normalize(tiny[2], "nope")


@pytest.fixture(scope="module")
def checkpoint(tiny, tmp_path_factory):
    model, params, _ = tiny
    dst = tmp_path_factory.mktemp("ckpt") / "tiny"
    config = {k: TINY[k] for k in ("variant", "num_classes", "width", "depth", "mlp_dim",
                                   "num_heads")}
    save_model(dst, jax.device_get(params), config, image_size=(64, 64),
               normalization="imagenet")
    return dst


def test_cli_end_to_end_and_bad_input(checkpoint, tiny, tmp_path, capsys):
    src = tmp_path / "photo.png"
    Image.fromarray(tiny[2]).convert("L").save(src)
    out = tmp_path / "merges.png"
    assert cli.main([str(src), "--checkpoint", str(checkpoint), "--r", "4", "8,-1",
                     "--out", str(out)]) == 0
    assert "converted to RGB" in capsys.readouterr().err
    with Image.open(out) as img:
        assert img.size[0] == 3 * 240
    # Several images: one row each; painted enlarged 4x (the model still sees 64 px).
    assert cli.main([str(src), str(src), "--checkpoint", str(checkpoint), "--r", "4",
                     "--display-scale", "4", "--out", str(out)]) == 0
    with Image.open(out) as img:
        assert img.size == (2 * 240, 2 * 270)
    rows = vis.visualise(*load_model(checkpoint)[:2], tiny[2], [4],
                         display_scale=4)
    assert rows[0][0][1].shape == (4 * 64, 4 * 64, 3) and rows[0][1][1].shape[:2] == (256, 256)
    (tmp_path / "bad.jpg").write_text("nope")
    assert cli.main([str(tmp_path / "bad.jpg"), "--checkpoint", str(checkpoint),
                     "--r", "4"]) == 2
    assert "cannot decode image" in capsys.readouterr().err
    assert cli.main([str(src), "--checkpoint", str(tmp_path), "--r", "4"]) == 2
    assert "not a converted checkpoint" in capsys.readouterr().err
    assert cli.main([str(src), "--checkpoint", str(checkpoint), "--r", "4",
                     "--image-size", "32"]) == 2
    assert "position embeddings cover 64 patches" in capsys.readouterr().err


def test_cli_takes_size_and_normalization_from_the_model_directory(checkpoint, tiny, tmp_path,
                                                                   monkeypatch):
    src = tmp_path / "photo.png"
    Image.fromarray(tiny[2]).save(src)
    seen = []

    def fake_visualise(model, params, image, rs, normalization, *args):
        seen.append((image.shape, rs, normalization))
        return [[("original", image)]]

    monkeypatch.setattr(vis, "visualise", fake_visualise)
    argv = [str(src), "--checkpoint", str(checkpoint), "--r", "4", "[2,2]",
            "--out", str(tmp_path / "m.png")]
    assert cli.main(argv) == 0
    assert cli.main(argv + ["--normalization", "augreg", "--image-size", "32"]) == 0
    assert seen == [((64, 64, 3), [4, [2, 2]], "imagenet"), ((32, 32, 3), [4, [2, 2]], "augreg")]


def test_real_photo_loads():
    files = sorted(PHOTOS.glob("*.JPEG"))
    if not files:
        pytest.skip(f"no photos under {PHOTOS} (the shared ImageNet sample)")
    image, note = vis.load_image(files[0], 224)
    assert image.shape == (224, 224, 3) and note is None and image.std() > 10
