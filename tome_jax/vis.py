"""Token-merge visualisation, as in the ToMe paper's figures.

Each final (or per-block) token holds a set of input patches (`source`, tracked by the model
with `trace_source=True`). Painting every patch of a group with the group's mean colour, with a
border between groups, shows what the network merged:

    python -m tome_jax.vis photo.jpg --checkpoint DIR --r 8 16 --out merges.png

    labels = patch_groups(source[0], num_prefix=1, grid_hw=(16, 16))   # [16, 16] group ids
    panel = paint_groups(image_u8, labels)                             # [H, W, 3] uint8

Shapes: H, W image pixels; gh, gw the patch grid; T = prefix + gh * gw input tokens; T' tokens
left after merging.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tome_jax import normalization as norm
from tome_jax.storage import AnyPath, as_path, is_remote

BORDER = (255, 255, 255)
DROPPED = (0, 0, 0)  # patches no token holds (the "prune" baseline drops tokens)


class VisError(ValueError):
    """An input the visualisation cannot use (undecodable image, model without sources)."""


# ----------------------------------------------------------------------------------------------
# Images.


def load_image(path: str | os.PathLike, image_size: int) -> tuple[np.ndarray, str | None]:
    """Decodes an image file -> (uint8 [S, S, 3], note or None).

    The shorter side is resized to S = image_size (bicubic), then centre-cropped, so the
    aspect ratio is kept. Non-RGB images (grayscale, RGBA, palette, CMYK) are converted to RGB
    and the note says so (RGBA is composited over white, not just stripped of alpha, so
    transparent areas do not turn into whatever colour the file stored under them).
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
    except FileNotFoundError:
        raise VisError(f"image file not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise VisError(f"cannot decode image {path}: {e}") from None
    img = ImageOps.exif_transpose(img)  # phone photos: show them the way they look
    note = None
    if img.mode != "RGB":
        note = f"note: {path.name} is mode {img.mode!r}, converted to RGB"
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            img = Image.new("RGB", rgba.size, (255, 255, 255))
            img.paste(rgba, mask=rgba.getchannel("A"))
        else:
            img = img.convert("RGB")
    w, h = img.size
    scale = image_size / min(w, h)
    nw, nh = max(image_size, round(w * scale)), max(image_size, round(h * scale))
    img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - image_size) // 2, (nh - image_size) // 2
    img = img.crop((left, top, left + image_size, top + image_size))
    return np.asarray(img, np.uint8), note


def normalize(image: np.ndarray, normalization: str = "imagenet") -> np.ndarray:
    """uint8 [..., H, W, 3] -> float32 model input with the named `tome_jax.normalization`."""
    try:
        mean, std = (np.asarray(v, np.float32) for v in norm.mean_std(normalization, scale=1.0))
    except ValueError as e:
        raise VisError(str(e)) from None
    return (image.astype(np.float32) / 255 - mean) / std


# ----------------------------------------------------------------------------------------------
# Groups from sources.


def patch_groups(source: np.ndarray, num_prefix: int, grid_hw: tuple[int, int]) -> np.ndarray:
    """source [T', T] 0/1 of one image -> group id per patch [gh, gw] int32.

    Ids are 0..G-1 in order of first appearance (row-major), so equal partitions give equal
    labels whatever order the tokens are in; -1 marks a patch no token holds (dropped by the
    "prune" strategy). Prefix tokens (class, distill, registers) are the first num_prefix input
    columns and are never merged with patches, so they are left out.
    """
    source = np.asarray(source)
    gh, gw = grid_hw
    if source.ndim != 2 or source.shape[1] != num_prefix + gh * gw:
        raise VisError(f"source of shape {source.shape} does not fit {num_prefix} prefix "
                       f"tokens + a {gh}x{gw} patch grid")
    patches = source[:, num_prefix:]
    held = patches.sum(axis=0)
    if not np.all((held == 0) | (held == 1)):
        raise VisError("source is not a partition of the patches (a patch must be held by at "
                       f"most one token; counts range {held.min()}..{held.max()})")
    owner = np.where(held == 1, patches.argmax(axis=0), -1)
    labels = np.full(owner.shape, -1, np.int32)
    kept = owner >= 0
    _, first, inverse = np.unique(owner[kept], return_index=True, return_inverse=True)
    rank = np.argsort(np.argsort(first))  # relabel by first appearance
    labels[kept] = rank[inverse.reshape(-1)]
    return labels.reshape(gh, gw)


def upsample_labels(labels: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """[gh, gw] -> [H, W] (nearest; H, W multiples of gh, gw)."""
    gh, gw = labels.shape
    h, w = hw
    if h % gh or w % gw:
        raise VisError(f"image {h}x{w} is not a whole number of {gh}x{gw} patches")
    return np.repeat(np.repeat(labels, h // gh, axis=0), w // gw, axis=1)


def group_means(image: np.ndarray, pixel_labels: np.ndarray) -> np.ndarray:
    """Mean colour of each group: image [H, W, 3], labels [H, W] in -1..G-1 -> [G, 3] float64
    (-1, dropped pixels, is left out)."""
    keep = pixel_labels.reshape(-1) >= 0
    flat = pixel_labels.reshape(-1)[keep]
    counts = np.bincount(flat, minlength=1)
    sums = np.stack([np.bincount(flat, weights=image[..., c].reshape(-1)[keep].astype(
        np.float64), minlength=len(counts)) for c in range(3)], axis=-1)
    return sums / np.maximum(counts, 1)[:, None]


def group_borders(pixel_labels: np.ndarray) -> np.ndarray:
    """[H, W] labels -> [H, W] bool, True on the pixel on each side of a label change."""
    edge = np.zeros(pixel_labels.shape, bool)
    dv = pixel_labels[1:] != pixel_labels[:-1]
    dh = pixel_labels[:, 1:] != pixel_labels[:, :-1]
    # Both sides of the change: a 2-pixel line, visible after downscaling in a figure.
    edge[1:] |= dv
    edge[:-1] |= dv
    edge[:, 1:] |= dh
    edge[:, :-1] |= dh
    return edge


def paint_groups(image: np.ndarray, labels: np.ndarray,
                 border: tuple[int, int, int] | None = BORDER) -> np.ndarray:
    """Each group's pixels in its mean colour, borders between groups, dropped patches
    (label -1) in DROPPED.

    image uint8 [H, W, 3], labels [gh, gw] -> uint8 [H, W, 3].
    """
    pixel_labels = upsample_labels(labels, image.shape[:2])
    means = group_means(image, pixel_labels)
    out = np.rint(means[np.maximum(pixel_labels, 0)]).clip(0, 255).astype(np.uint8)
    out[pixel_labels < 0] = DROPPED
    if border is not None:
        out[group_borders(pixel_labels)] = border
    return out


# ----------------------------------------------------------------------------------------------
# Model.


def check_traceable(model: Any) -> None:
    """Raises VisError unless `model` is a ViT-like module that can track sources."""
    fields = getattr(type(model), "__dataclass_fields__", {})
    missing = [f for f in ("trace_source", "r") if f not in fields]
    if missing or not hasattr(model, "num_prefix_tokens") or not hasattr(model, "dims"):
        raise VisError(f"{type(model).__name__} does not support source tracking (no "
                       f"{', '.join(missing) or 'num_prefix_tokens/dims'}); the visualisation "
                       "needs a tome_jax.vit.ViT (trace_source=True)")


def merge_sources(model: Any, params: Any, images: np.ndarray, r: Any,
                  per_layer: bool = False) -> list[np.ndarray]:
    """Sources of a batch at schedule r.

    images [B, H, W, 3] (normalised) -> [source after the last block] or, with per_layer, one
    source per block; each [B, T_i, T] float 0/1.
    """
    import jax

    from tome_jax.vit import Encoder1DBlock

    check_traceable(model)
    model = model.clone(r=r, trace_source=True)
    gh, gw = (n // model.dims.patch_size for n in images.shape[1:3])
    pos = params.get("pos_embedding") if hasattr(params, "get") else None
    if pos is not None and pos.shape[1] != gh * gw:
        raise VisError(f"the checkpoint's position embeddings cover {pos.shape[1]} patches, "
                       f"a {images.shape[1]}x{images.shape[2]} image has {gh}x{gw}: use the "
                       "checkpoint's image size or reconvert it with --image-size")
    capture = (lambda m, _: isinstance(m, Encoder1DBlock)) if per_layer else False

    @jax.jit
    def run(p, x):
        return model.apply({"params": p}, x, capture_intermediates=capture)

    result = run(params, images)
    if per_layer:
        (_, out), state = result
        blocks = state["intermediates"]["Transformer"]
        sources = [blocks[f"encoderblock_{i}"]["__call__"][0].source
                   for i in range(model.dims.depth)]
    else:
        _, out = result
        sources = [out.get("source")]
    if any(s is None for s in sources):
        raise VisError(f"{type(model).__name__} returned no source with trace_source=True; "
                       "it does not support source tracking")
    return [np.asarray(s) for s in sources]


# ----------------------------------------------------------------------------------------------
# Figures.


def render_grid(rows: Sequence[Sequence[tuple[str, np.ndarray]]], path: str | os.PathLike,
                panel_inches: float = 2.4, dpi: int = 100) -> AnyPath:
    """Writes a PNG grid: rows of (title, uint8 [H, W, 3]) panels. Returns the path, which may
    be an object-store URL (gs://...); the suffix picks the format (.png, .pdf, .svg)."""
    # A bare Figure, not pyplot: no display needed, and a notebook's backend is left alone.
    from matplotlib.figure import Figure

    nrows, ncols = len(rows), max(len(r) for r in rows)
    fig = Figure(figsize=(panel_inches * ncols, (panel_inches + 0.3) * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, row in enumerate(rows):
        for j, (title, img) in enumerate(row):
            axes[i, j].imshow(img, interpolation="nearest")
            axes[i, j].set_title(title, fontsize=9)
    fig.tight_layout(pad=0.3)
    path = as_path(path)
    options = dict(dpi=dpi, pil_kwargs={"optimize": True})  # smaller files for docs/
    if is_remote(path):  # matplotlib writes local files: the bytes are written as one object
        buffer = io.BytesIO()
        fig.savefig(buffer, format=path.suffix[1:] or "png", **options)
        path.write_bytes(buffer.getvalue())
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, **options)
    return path


def _title(head: str, tokens: int, labels: np.ndarray) -> str:
    dropped = int((labels < 0).sum())
    return f"{head}: {tokens} tokens" + (f", {dropped} dropped" if dropped else "")


def visualise(model: Any, params: Any, image: np.ndarray, rs: Sequence[Any],
              normalization: str = "imagenet", layers: Sequence[int] | None = None,
              display_scale: int = 1) -> list[list[tuple[str, np.ndarray]]]:
    """Panels for one uint8 image [H, W, 3]: one row per r (or a single row when layers is
    None): the original, then the merged groups at the end (layers None) or after each listed
    block (1-based, e.g. [3, 6, 9, 12]). Titles give r and the token count.

    display_scale: paint on the image enlarged this many times (nearest neighbour), so group
    borders stay thin on small inputs such as CIFAR's 32 px.
    """
    check_traceable(model)
    if display_scale < 1:
        raise VisError(f"display_scale must be >= 1, got {display_scale}")
    x = normalize(image, normalization)[None]
    patch = model.dims.patch_size
    grid = (image.shape[0] // patch, image.shape[1] // patch)
    prefix = model.num_prefix_tokens
    image = np.repeat(np.repeat(image, display_scale, axis=0), display_scale, axis=1)
    original = ("original", image)
    if layers is None:
        row = [original]
        for r in rs:
            (source,) = merge_sources(model, params, x, r)
            labels = patch_groups(source[0], prefix, grid)
            row.append((_title(f"r = {r}", source.shape[1], labels),
                        paint_groups(image, labels)))
        return [row]
    depth = model.dims.depth
    bad = [i for i in layers if not 1 <= i <= depth]
    if bad:
        raise VisError(f"layers {bad} outside 1..{depth}")
    rows = []
    for r in rs:
        sources = merge_sources(model, params, x, r, per_layer=True)
        row = [original]
        for i in layers:
            labels = patch_groups(sources[i - 1][0], prefix, grid)
            row.append((_title(f"r = {r}, block {i}", sources[i - 1].shape[1], labels),
                        paint_groups(image, labels)))
        rows.append(row)
    return rows


if __name__ == "__main__":
    from tome_jax.cli.vis import main

    raise SystemExit(main())
