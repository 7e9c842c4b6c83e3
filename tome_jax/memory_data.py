"""Small image datasets held whole in accelerator memory and augmented there.

    split = read_image_folder("../shared/data/cifar10-jpeg.tar", "train", image_size=32)
    stream = DeviceStream(split, batch_size=512, mesh=mesh, seed=0)
    batch = stream.batch(step)  # {"image": [B, S, S, 3] float32 normalised, "label": [B] int32}

For datasets the size of CIFAR (50,000 images of 32 x 32 are 150 MB as uint8) the host input
pipeline is what limits an accelerator: a small ViT trains faster than two or even sixteen CPU
cores can decode and augment JPEGs. Here the split is decoded once (PIL, no TensorFlow), placed
on every device, and each training batch is drawn and augmented by a jitted function on the
devices themselves: a permutation per epoch, then the CIFAR recipe (4-pixel reflect padding, a
random 32 x 32 crop, a random horizontal flip; `tome_jax.data`'s "pad_crop_flip"). Batch `step`
is a pure function of (seed, step), so a resumed run draws exactly the batches it would have.

The output is a global array split over the mesh's batch axis; each device computes only its own
rows. Every process holds the whole split (it is small), so the same code runs on one device, on
many, and on several processes.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import math
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from tome_jax import image_files, sharding
from tome_jax.image_files import IMAGE_SUFFIXES, BadImage, BadImageError
from tome_jax.normalization import normalize


@dataclasses.dataclass(frozen=True)
class ImageArrays:
    """A decoded split. images [N, S, S, 3] uint8; labels [N] int32; class_names [K];
    skipped: the files left out as undecodable (`read_image_folder(skip_bad_images=True)`)."""

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    skipped: tuple[BadImage, ...] = ()

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


Member = tuple[str, str, bytes, str]  # (class, file name, encoded bytes, where: path or tar:name)


def _members(source: Path, split: str) -> list[Member]:
    """[(class, file name, encoded bytes, where)] of `<split>/<class>/<file>` in a folder or
    tar, sorted by (class, file name); `where` names the file in messages."""
    found = []
    if source.is_dir():
        root = source / split
        if not root.is_dir():
            splits = sorted(p.name for p in source.iterdir() if p.is_dir())
            raise ValueError(f"{source} has no split folder {split!r} (splits: {splits})")
        splits = {split}
        for path in sorted(root.glob("*/*")):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                found.append((path.parent.name, path.name, image_files.read_bytes(path),
                              str(path)))
    elif not source.is_file():
        raise FileNotFoundError(f"image folder or archive not found: {source}")
    else:
        splits = set()
        try:
            # "r:*" reads plain, gzip, bzip2 and xz tars alike; members may sit under a prefix.
            with tarfile.open(source, "r:*") as tar:
                for member in tar:
                    parts = member.name.split("/")
                    if not member.isfile() or len(parts) < 3:
                        continue
                    splits.add(parts[-3])
                    if parts[-3] == split and Path(parts[-1]).suffix.lower() in IMAGE_SUFFIXES:
                        found.append((parts[-2], parts[-1], tar.extractfile(member).read(),
                                      f"{source}:{member.name}"))
        except (tarfile.TarError, EOFError, OSError) as e:
            raise ValueError(f"corrupt or unreadable archive {source}: {e}") from e
    if not found:
        raise ValueError(f"{source} has no images under split {split!r} (splits: "
                         f"{sorted(splits)})")
    return sorted(found)


def _decode(member: Member, image_size: int, expected: str | None) -> np.ndarray | BadImage:
    """[S, S, 3] uint8 (resized bilinear when not S square), or why the file is unusable.

    expected: its sha256 from the folder's manifest (None: not listed).
    """
    from PIL import Image

    encoded, where = member[2], member[3]
    problem = image_files.checksum_problem(encoded, expected)
    image = None
    if problem is None:
        image, problem = image_files.decode_rgb(encoded)
    if problem:
        return BadImage(where, problem)
    if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.BILINEAR)
    return np.asarray(image, np.uint8)


def read_image_folder(source: str | os.PathLike, split: str, image_size: int,
                      threads: int | None = None, *,
                      skip_bad_images: bool = False) -> ImageArrays:
    """Decodes every image of `<split>/<class>/*` in a folder or a (compressed) tar.

    Labels index the sorted class folder names (as `tfds.ImageFolder` numbers them); examples
    are ordered by (class, file name). Images not image_size square are resized (bilinear).
    Returns images [N, image_size, image_size, 3] uint8 and labels [N] int32.

    A file that does not decode (or, in a folder with a SHA256SUMS manifest, differs from it;
    see `tome_jax.image_files`) raises BadImageError naming it, unless skip_bad_images: then
    it is left out and listed in the result's `skipped`.
    """
    source = Path(source)
    members = _members(source, split)
    manifest = image_files.read_manifest(source) if source.is_dir() else None
    expected = [(manifest or {}).get(f"{split}/{c}/{name}") for c, name, _, _ in members]
    class_names = tuple(sorted({m[0] for m in members}))
    index = {c: i for i, c in enumerate(class_names)}
    with concurrent.futures.ThreadPoolExecutor(threads or min(16, os.cpu_count() or 1)) as pool:
        decoded = list(pool.map(lambda args: _decode(args[0], image_size, args[1]),
                                zip(members, expected, strict=True), chunksize=256))
    bad = [d for d in decoded if isinstance(d, BadImage)]
    if bad and not skip_bad_images:
        raise image_files.bad_images_error(bad, f"{source} {split!r}")
    keep = [i for i, d in enumerate(decoded) if not isinstance(d, BadImage)]
    if not keep:
        raise BadImageError(f"{bad[0]}; no decodable image left in {source} {split!r} "
                            f"({len(bad)} bad)")
    labels = np.array([index[members[i][0]] for i in keep], np.int32)
    return ImageArrays(np.stack([decoded[i] for i in keep]), labels, class_names, tuple(bad))


def augment_batch(images: jax.Array, keys: jax.Array, pad: int) -> jax.Array:
    """The CIFAR recipe per image: reflect-pad, random crop back to size, random flip.

    images [B, S, S, C] (any dtype); keys [B] PRNG keys. Returns [B, S, S, C], same dtype.
    """
    size = images.shape[1]
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")

    def one(image, key):
        k_y, k_x, k_flip = jax.random.split(key, 3)
        y = jax.random.randint(k_y, (), 0, 2 * pad + 1)
        x = jax.random.randint(k_x, (), 0, 2 * pad + 1)
        crop = jax.lax.dynamic_slice(image, (y, x, 0), (size, size, image.shape[-1]))
        return jnp.where(jax.random.bernoulli(k_flip), crop[:, ::-1], crop)

    return jax.vmap(one)(padded, keys)


def draw_batch(images: jax.Array, labels: jax.Array, step: jax.Array, *, batch_size: int,
               seed: int, normalization: str, pad: int) -> dict[str, jax.Array]:
    """Training batch `step` of the endless stream over (images [N, S, S, 3], labels [N]).

    Epoch e = step // (N // batch_size) visits a permutation fixed by (seed, e); the last
    partial batch of an epoch is dropped. Each image's crop and flip come from a key fixed by
    (seed, step, row). Returns {"image": [B, S, S, 3] float32, "label": [B] int32}.
    """
    n = labels.shape[0]
    per_epoch = n // batch_size
    epoch, position = step // per_epoch, step % per_epoch
    base = jax.random.key(seed)
    order = jax.random.permutation(jax.random.fold_in(jax.random.fold_in(base, 0), epoch), n)
    rows = jax.lax.dynamic_slice_in_dim(order, position * batch_size, batch_size)
    keys = jax.random.split(jax.random.fold_in(jax.random.fold_in(base, 1), step), batch_size)
    batch = augment_batch(images[rows], keys, pad)
    return {"image": normalize(batch, normalization), "label": labels[rows]}


class DeviceStream:
    """The training stream of one split, on the devices of `mesh` (see the module doc).

    batch_size is global (over every device and process). `batch(step)` returns batch-sharded
    jax.Arrays; `steps_per_epoch` = N // batch_size.
    """

    def __init__(self, split: ImageArrays, *, batch_size: int, mesh: Mesh, seed: int = 0,
                 normalization: str = "augreg", pad: int | None = None):
        n = len(split.labels)
        if batch_size < 1 or n < batch_size:
            raise ValueError(f"batch_size {batch_size} needs 1..{n} (the split's size)")
        if batch_size % mesh.devices.size:
            raise ValueError(f"batch_size {batch_size} is not divisible by the "
                             f"{mesh.devices.size} devices")
        normalize(np.zeros(3), normalization)  # names a bad normalization now
        self.steps_per_epoch = n // batch_size
        whole = sharding.replicated(mesh)
        # From each process's own copy: no transfer between hosts, any device count.
        self.images = jax.make_array_from_callback(split.images.shape, whole,
                                                   lambda idx: split.images[idx])
        self.labels = jax.make_array_from_callback(split.labels.shape, whole,
                                                   lambda idx: split.labels[idx])
        pad = max(split.images.shape[1] // 8, 1) if pad is None else pad
        draw = functools.partial(draw_batch, batch_size=batch_size, seed=seed,
                                 normalization=normalization, pad=pad)
        self._draw = jax.jit(draw, out_shardings=sharding.batch_sharding(mesh))

    def batch(self, step: int) -> dict[str, jax.Array]:
        return self._draw(self.images, self.labels, jnp.asarray(step, jnp.int32))


def eval_batches(split: ImageArrays, batch_size: int, normalization: str = "augreg",
                 process_index: int | None = None,
                 process_count: int | None = None) -> list[dict[str, np.ndarray]]:
    """This process's evaluation batches, as `tome_jax.data.make_dataset(train=False)` gives.

    numpy dicts "image" [b, S, S, 3] float32 (normalised), "label", "mask" (False on padding),
    "index" (position in the split, -1 on padding); b = ceil(batch_size / process_count), and
    every process gets the same number of batches.
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    n = len(split.labels)
    lo, hi = sharding.host_slice(n, process_index, process_count)
    local = math.ceil(batch_size / process_count)
    # Every process runs the same number of steps, sized by the largest share.
    num_batches = math.ceil(math.ceil(n / process_count) / local)
    out = []
    for b in range(num_batches):
        rows = np.arange(lo + b * local, lo + (b + 1) * local)
        mask = rows < hi
        take = np.where(mask, rows, lo if hi > lo else 0)
        image = normalize(split.images[take], normalization)
        image[~mask] = 0
        out.append({"image": image, "label": np.where(mask, split.labels[take], 0),
                    "mask": mask, "index": np.where(mask, rows, -1).astype(np.int32)})
    return out


def iterate(stream: DeviceStream, start: int) -> Iterator[dict[str, jax.Array]]:
    """stream.batch(start), stream.batch(start + 1), ... (endless)."""
    step = start
    while True:
        yield stream.batch(step)
        step += 1
