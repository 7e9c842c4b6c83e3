"""RandAugment ops against PIL (the library the policies were defined with) on real images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageEnhance, ImageOps

from tome_jax import randaugment as RA

IMAGES = sorted((Path(__file__).parent.parent / "data/cifar10-test-1000/test").glob("*/*"))[:12]
GREY = (128, 128, 128)
GEOMETRIC = ("translate", "shear", "rotate")


def _pil_affine(matrix):
    return lambda im: im.transform(im.size, Image.AFFINE, matrix, resample=Image.BILINEAR,
                                   fillcolor=GREY)


# (our op, PIL's op, largest allowed difference in 0..255 levels). PIL rounds to uint8 where we
# stay in float, hence up to about 1 level apart on the rounded ops.
PARITY = {
    "autocontrast": (RA.autocontrast, ImageOps.autocontrast, 1.0),
    "equalize": (RA.equalize, ImageOps.equalize, 0.0),
    "solarize": (lambda x: RA.solarize(x, 140.0), lambda im: ImageOps.solarize(im, 140), 0.0),
    "posterize": (lambda x: RA.posterize(x, tf.constant(5)),
                  lambda im: ImageOps.posterize(im, 5), 0.0),
    "color": (lambda x: RA.color(x, 1.7), lambda im: ImageEnhance.Color(im).enhance(1.7), 1.5),
    "contrast": (lambda x: RA.contrast(x, 0.4),
                 lambda im: ImageEnhance.Contrast(im).enhance(0.4), 1.0),
    "brightness": (lambda x: RA.brightness(x, 1.5),
                   lambda im: ImageEnhance.Brightness(im).enhance(1.5), 1.0),
    "sharpness": (lambda x: RA.sharpness(x, 1.8),
                  lambda im: ImageEnhance.Sharpness(im).enhance(1.8), 1.0),
    "translate_x": (lambda x: RA.translate_x(x, 5.0), _pil_affine((1, 0, 5, 0, 1, 0)), 0.0),
    "translate_y": (lambda x: RA.translate_y(x, -7.0), _pil_affine((1, 0, 0, 0, 1, -7)), 0.0),
    "shear_x": (lambda x: RA.shear_x(x, 0.2), _pil_affine((1, 0.2, 0, 0, 1, 0)), 1.01),
    "shear_y": (lambda x: RA.shear_y(x, -0.25), _pil_affine((1, 0, 0, -0.25, 1, 0)), 1.01),
    "rotate": (lambda x: RA.rotate(x, 20.0),
               lambda im: im.rotate(20, resample=Image.BILINEAR, fillcolor=GREY), 1.0),
    "rotate_90": (lambda x: RA.rotate(x, 90.0), lambda im: im.rotate(90, fillcolor=GREY), 1e-3),
}


def _interior(pil_op, size) -> np.ndarray:
    """[H, W] True where the op reads only inside the image: the edge of the fill region is
    interpolated differently by PIL (clamped neighbours) and TF (fill-value neighbours), so
    pixels within 2 of it are left out."""
    white = Image.new("RGB", size, (255, 255, 255))
    inside = np.asarray(pil_op(white))[..., 0] == 255
    padded = np.pad(inside, 2, constant_values=True)
    return np.all([padded[2 + dy:2 + dy + size[1], 2 + dx:2 + dx + size[0]]
                   for dy in range(-2, 3) for dx in range(-2, 3)], axis=0)


@pytest.mark.parametrize("name", sorted(PARITY))
def test_op_matches_pil(name):
    ours, theirs, tolerance = PARITY[name]
    assert len(IMAGES) == 12
    for path in IMAGES:
        image = Image.open(path).convert("RGB")
        got = ours(tf.constant(np.asarray(image), tf.float32)).numpy()
        want = np.asarray(theirs(image)).astype(np.float32)
        mask = (_interior(theirs, image.size) if name.startswith(GEOMETRIC)
                else np.ones(got.shape[:2], bool))
        assert mask.mean() > 0.5, "the comparison must cover most of the image"
        diff = np.abs(got - want)[mask]
        assert diff.max() <= tolerance, (name, path.name, diff.max())
        assert got.shape == want.shape and 0 <= got.min() and got.max() <= 255


def test_every_op_changes_an_image_at_full_magnitude_and_none_does_at_zero_geometry():
    image = tf.constant(np.asarray(Image.open(IMAGES[0]).convert("RGB")), tf.float32)
    for op, name in enumerate(RA.OPS):
        out = RA.apply_op(image, op, 10.0, sign=-1.0).numpy()
        assert out.shape == (32, 32, 3) and 0 <= out.min() and out.max() <= 255
        changed = not np.allclose(out, image.numpy())
        assert changed == (name != "identity"), name
        if name not in ("autocontrast", "equalize"):  # the two ops without a magnitude
            np.testing.assert_allclose(RA.apply_op(image, op, 0.0).numpy(), image.numpy(),
                                       atol=1e-3, err_msg=name)


def test_randaugment_is_fixed_by_its_seed():
    image = tf.constant(np.asarray(Image.open(IMAGES[1]).convert("RGB")), tf.float32)
    seed = tf.constant([3, 4], tf.int64)
    a = RA.randaugment(image, 2, 9.0, seed).numpy()
    np.testing.assert_array_equal(a, RA.randaugment(image, 2, 9.0, seed).numpy())
    others = [RA.randaugment(image, 2, 9.0, tf.constant([3, s], tf.int64)).numpy()
              for s in range(5, 15)]
    assert sum(not np.array_equal(a, o) for o in others) >= 8
    np.testing.assert_array_equal(RA.randaugment(image, 0, 9.0, seed).numpy(), image.numpy())


def test_bad_settings_are_refused():
    image = tf.zeros((8, 8, 3))
    with pytest.raises(ValueError, match="magnitude must be in \\[0, 10\\], got 11"):
        RA.randaugment(image, 2, 11.0, tf.constant([0, 0], tf.int64))
    with pytest.raises(ValueError, match="num_ops must be >= 0, got -1"):
        RA.randaugment(image, -1, 5.0, tf.constant([0, 0], tf.int64))
