"""RandAugment (Cubuk et al. 2020) as stateless TensorFlow ops for the tf.data input pipeline.

    image = randaugment(image, num_ops=2, magnitude=9, seed=seed)   # [H, W, 3] float 0..255

Each of `num_ops` rounds picks one of `OPS` uniformly and applies it at the fixed `magnitude`
(0..10; 10 is the strongest); ops with a direction (rotate, shear, translate, the enhancements)
pick a random sign. The ops follow PIL's definitions (ImageOps / ImageEnhance), the library the
paper's policies were written against, with magnitudes "increasing": a larger magnitude is
always a stronger distortion (lower solarize threshold, fewer posterize bits). Geometric ops fill
uncovered pixels with mid-grey (128). Every random choice comes from `seed` ([2] int), so one
seed fixes the result, which keeps a resumed training stream identical to an uninterrupted one.
"""

from __future__ import annotations

import math

import tensorflow as tf

FILL = 128.0
MAX_ROTATE_DEG = 30.0
MAX_SHEAR = 0.3
MAX_TRANSLATE = 0.45  # of the image side
MAX_ENHANCE = 0.9  # enhancement factor 1 +- 0.9 at magnitude 10


def _blend(degenerate: tf.Tensor, image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """PIL ImageEnhance: degenerate + factor * (image - degenerate), clipped to 0..255."""
    return tf.clip_by_value(degenerate + factor * (image - degenerate), 0.0, 255.0)


def _grayscale(image: tf.Tensor) -> tf.Tensor:
    """[H, W, 3] -> [H, W, 1] with PIL's "L" weights."""
    return tf.reduce_sum(image * tf.constant([0.299, 0.587, 0.114]), -1, keepdims=True)


def color(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    return _blend(tf.broadcast_to(_grayscale(image), tf.shape(image)), image, factor)


def contrast(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    mean = tf.round(tf.reduce_mean(tf.round(_grayscale(image))))
    return _blend(tf.fill(tf.shape(image), mean), image, factor)


def brightness(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    return _blend(tf.zeros_like(image), image, factor)


def sharpness(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """Blend with PIL's SMOOTH filter (3x3, centre 5, total 13); border pixels stay as they are."""
    kernel = tf.constant([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0
    kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
    smooth = tf.nn.depthwise_conv2d(image[None], kernel, [1, 1, 1, 1], "VALID")[0]
    smooth = tf.round(smooth)
    inner = tf.pad(tf.ones_like(smooth), [[1, 1], [1, 1], [0, 0]])
    degenerate = tf.pad(smooth, [[1, 1], [1, 1], [0, 0]]) * inner + image * (1.0 - inner)
    return _blend(degenerate, image, factor)


def solarize(image: tf.Tensor, threshold: tf.Tensor) -> tf.Tensor:
    """Inverts every pixel value >= threshold."""
    return tf.where(image >= threshold, 255.0 - image, image)


def posterize(image: tf.Tensor, bits: tf.Tensor) -> tf.Tensor:
    """Keeps the top `bits` bits of each (rounded) 8-bit value."""
    shift = tf.cast(8 - bits, tf.int32)
    pixels = tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.int32)
    return tf.cast(tf.bitwise.left_shift(tf.bitwise.right_shift(pixels, shift), shift),
                   tf.float32)


def autocontrast(image: tf.Tensor) -> tf.Tensor:
    """Per channel, stretches [min, max] to [0, 255] (a flat channel is left as it is)."""
    lo = tf.reduce_min(image, axis=[0, 1], keepdims=True)
    hi = tf.reduce_max(image, axis=[0, 1], keepdims=True)
    scale = 255.0 / tf.maximum(hi - lo, 1e-6)
    return tf.where(hi > lo, tf.clip_by_value((image - lo) * scale, 0.0, 255.0), image)


def _equalize_channel(channel: tf.Tensor) -> tf.Tensor:
    """PIL ImageOps.equalize on one [H, W] channel of integer values 0..255."""
    values = tf.cast(channel, tf.int32)
    hist = tf.math.bincount(tf.reshape(values, [-1]), minlength=256, maxlength=256)
    last = tf.gather(hist, tf.reduce_max(tf.where(hist > 0)))  # count of the top value
    step = (tf.reduce_sum(hist) - last) // 255

    def equalized():
        lut = (tf.cumsum(hist) + step // 2) // step
        lut = tf.clip_by_value(tf.concat([[0], lut[:-1]], 0), 0, 255)
        return tf.cast(tf.gather(lut, values), tf.float32)

    return tf.cond(step > 0, equalized, lambda: tf.cast(values, tf.float32))


def equalize(image: tf.Tensor) -> tf.Tensor:
    pixels = tf.clip_by_value(tf.round(image), 0.0, 255.0)
    return tf.stack([_equalize_channel(pixels[..., c]) for c in range(3)], -1)


def _affine(image: tf.Tensor, matrix: tf.Tensor) -> tf.Tensor:
    """PIL's Image.transform(AFFINE, matrix): output point (x, y) samples input point
    (a x + b y + c, d x + e y + f), in continuous coordinates where pixel i spans [i, i + 1)."""
    a, b, c, d, e, f = tf.unstack(tf.cast(matrix, tf.float32))
    # TF's transform works on pixel indices (centres at integers): shift by half a pixel.
    index_matrix = tf.stack([a, b, c + (a + b - 1) / 2, d, e, f + (d + e - 1) / 2,
                             0.0, 0.0])[None]
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=image[None], transforms=index_matrix, output_shape=tf.shape(image)[:2],
        fill_value=FILL, interpolation="BILINEAR", fill_mode="CONSTANT")[0]


def rotate(image: tf.Tensor, degrees: tf.Tensor) -> tf.Tensor:
    """Counter-clockwise about the centre, like PIL's Image.rotate."""
    h, w = tf.cast(tf.shape(image)[0], tf.float32), tf.cast(tf.shape(image)[1], tf.float32)
    a = degrees * math.pi / 180.0
    cx, cy = w / 2, h / 2
    cos, sin = tf.cos(a), tf.sin(a)
    # The inverse map: output points rotate clockwise about the centre onto the input.
    return _affine(image, tf.stack([cos, -sin, cx - cos * cx + sin * cy,
                                    sin, cos, cy - sin * cx - cos * cy]))


def shear_x(image: tf.Tensor, shear: tf.Tensor) -> tf.Tensor:
    return _affine(image, tf.stack([1.0, shear, 0.0, 0.0, 1.0, 0.0]))


def shear_y(image: tf.Tensor, shear: tf.Tensor) -> tf.Tensor:
    return _affine(image, tf.stack([1.0, 0.0, 0.0, shear, 1.0, 0.0]))


def translate_x(image: tf.Tensor, pixels: tf.Tensor) -> tf.Tensor:
    """Content moves left by `pixels` (PIL's affine convention)."""
    return _affine(image, tf.stack([1.0, 0.0, pixels, 0.0, 1.0, 0.0]))


def translate_y(image: tf.Tensor, pixels: tf.Tensor) -> tf.Tensor:
    return _affine(image, tf.stack([1.0, 0.0, 0.0, 0.0, 1.0, pixels]))


def _ops(image: tf.Tensor, magnitude: float, sign: tf.Tensor) -> list:
    """The 14 RandAugment ops at `magnitude` as thunks; `sign` is +-1 for directed ops."""
    level = magnitude / 10.0
    side = tf.cast(tf.shape(image)[1], tf.float32)
    enhance = 1.0 + sign * MAX_ENHANCE * level
    return [
        lambda: image,
        lambda: autocontrast(image),
        lambda: equalize(image),
        lambda: rotate(image, sign * MAX_ROTATE_DEG * level),
        lambda: solarize(image, 256.0 - 128.0 * level),
        lambda: color(image, enhance),
        lambda: posterize(image, tf.constant(8 - int(4 * level))),
        lambda: contrast(image, enhance),
        lambda: brightness(image, enhance),
        lambda: sharpness(image, enhance),
        lambda: shear_x(image, sign * MAX_SHEAR * level),
        lambda: shear_y(image, sign * MAX_SHEAR * level),
        lambda: translate_x(image, sign * MAX_TRANSLATE * level * side),
        lambda: translate_y(image, sign * MAX_TRANSLATE * level * side),
    ]


OPS = ("identity", "autocontrast", "equalize", "rotate", "solarize", "color", "posterize",
       "contrast", "brightness", "sharpness", "shear_x", "shear_y", "translate_x", "translate_y")


def apply_op(image: tf.Tensor, op: int | tf.Tensor, magnitude: float,
             sign: float | tf.Tensor = 1.0) -> tf.Tensor:
    """One op (an index into `OPS`) at `magnitude`; [H, W, 3] float 0..255 -> same."""
    image = tf.convert_to_tensor(image, tf.float32)
    branches = _ops(image, magnitude, tf.cast(sign, tf.float32))
    out = tf.switch_case(tf.cast(op, tf.int32), branches)
    return tf.ensure_shape(out, image.shape)


def check_settings(num_ops: int, magnitude: float) -> None:
    """Raises ValueError naming the bad setting."""
    if not 0 <= magnitude <= 10:
        raise ValueError(f"RandAugment magnitude must be in [0, 10], got {magnitude}")
    if num_ops < 0:
        raise ValueError(f"RandAugment num_ops must be >= 0, got {num_ops}")


def randaugment(image: tf.Tensor, num_ops: int, magnitude: float, seed: tf.Tensor) -> tf.Tensor:
    """[H, W, 3] float 0..255 -> same, after `num_ops` random ops; seed [2] int."""
    check_settings(num_ops, magnitude)
    seeds = tf.random.experimental.stateless_split(seed, max(2 * num_ops, 1))
    for i in range(num_ops):
        op = tf.random.stateless_uniform([], seeds[2 * i], 0, len(OPS), tf.int32)
        sign = tf.where(tf.random.stateless_uniform([], seeds[2 * i + 1]) < 0.5, -1.0, 1.0)
        image = apply_op(image, op, magnitude, sign)
    return image
