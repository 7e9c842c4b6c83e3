"""Where each named dataset comes from, exposed as a tfds builder.

Every source is a `tfds.core.DatasetBuilder`, so `tome_jax.data` reads all of them the same way:

    name                 builder                                 data_dir (None: the default)
    cifar10              tfds `cifar10` (network)                tfds data dir
    fashion_mnist        tfds `fashion_mnist` (network)          tfds data dir
    imagenet2012         tfds `imagenet2012`, manual download    folder with the ILSVRC2012 tars
    cifar10_jpeg         `tfds.ImageFolder` over the extracted   the archive (.tar) or the
                         `../shared/data/cifar10-jpeg.tar`       extracted folder
    fashion_mnist_local  `FashionMnistLocal` (idx files of the   the folder of the 4 .gz files
                         Debian package dataset-fashion-mnist)   (/usr/share/datasets/...)
    imagenet_sample      `ImagenetSample` (the 100 photos of     the folder of the photos
                         `../shared/data/imagenet-sample-100`)   and wnids-1000.txt
    image_folder         `tfds.ImageFolder`                      `<dir>/<split>/<class>/*.jpg`

Extracted and prepared files go under `cache_dir()` (`$TOME_JAX_CACHE`, default
`~/.cache/tome_jax`), never into the repository. `../shared` is `shared_dir()`
(`$TOME_JAX_SHARED`, default the `shared` folder beside the repository root).
"""

from __future__ import annotations

import os
import shutil
import socket
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import tensorflow_datasets as tfds

NETWORK = ("cifar10", "fashion_mnist", "imagenet2012")
OFFLINE = ("cifar10_jpeg", "fashion_mnist_local", "imagenet_sample", "image_folder")
NAMES = NETWORK + OFFLINE

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")
_CIFAR10_JPEG_COUNTS = {"train": 50_000, "test": 10_000}
FASHION_MNIST_FILES = {
    "train_data": "train-images-idx3-ubyte.gz", "train_labels": "train-labels-idx1-ubyte.gz",
    "test_data": "t10k-images-idx3-ubyte.gz", "test_labels": "t10k-labels-idx1-ubyte.gz"}
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def shared_dir() -> Path:
    """The project's read-only `shared` folder (`$TOME_JAX_SHARED` or `<repo>/../shared`)."""
    return Path(os.environ.get("TOME_JAX_SHARED", repo_root().parent / "shared"))


def cache_dir() -> Path:
    """Where extracted archives and prepared tfds datasets go (`$TOME_JAX_CACHE`)."""
    return Path(os.environ.get("TOME_JAX_CACHE", Path.home() / ".cache" / "tome_jax"))


def default_data_dir(name: str) -> Path | None:
    """The default `data_dir` of a source (None: tfds' own default)."""
    return {
        "cifar10_jpeg": shared_dir() / "data" / "cifar10-jpeg.tar",
        "fashion_mnist_local": Path(FASHION_MNIST_DIR),
        "imagenet_sample": shared_dir() / "data" / "imagenet-sample-100",
    }.get(name)


def extract_cifar10_jpeg(archive: str | os.PathLike, out_root: Path | None = None) -> Path:
    """Extracts the CIFAR-10 JPEG archive once into the cache; returns the folder.

    The folder holds `train/<class>/*.jpg` and `test/<class>/*.jpg`. Extraction goes to a
    temporary name first and is renamed when complete and counted, so an interrupted run or a
    damaged archive never leaves a half folder that later runs would trust.
    """
    archive = Path(archive)
    if not archive.is_file():
        raise FileNotFoundError(f"CIFAR-10 JPEG archive not found: {archive} (set data_dir or "
                                "$TOME_JAX_SHARED)")
    out_root = out_root or cache_dir()
    stat = archive.stat()
    out = out_root / f"cifar10-jpeg-{stat.st_size}"
    if (out / ".complete").exists():
        return out
    tmp = out_root / f"{out.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        check_image_folder(tmp, _CIFAR10_JPEG_COUNTS, CIFAR10_CLASSES)
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ValueError(f"corrupt CIFAR-10 JPEG archive {archive}: {e}") from e
    (tmp / ".complete").touch()
    try:
        tmp.rename(out)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def check_image_folder(root: Path, counts: dict[str, int] | None = None,
                       classes: tuple[str, ...] | None = None) -> None:
    """Raises ValueError unless root is `<split>/<class>/<images>` (with these counts/classes)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    splits = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not splits:
        raise ValueError(f"{root} holds no split folders; expected <split>/<class>/<image>")
    for split in (counts or {}):
        if split not in splits:
            raise ValueError(f"{root} lacks the split folder {split!r} (has {splits})")
        found = sorted(p.name for p in (root / split).iterdir() if p.is_dir())
        if classes is not None and tuple(found) != tuple(sorted(classes)):
            raise ValueError(f"{root / split} has classes {found}, expected {sorted(classes)}")
        n = sum(1 for p in (root / split).glob("*/*") if p.is_file())
        if n != counts[split]:
            raise ValueError(f"{root / split} holds {n} images, expected {counts[split]}")


def _prepared(builder_cls, manual_dir: Path, required: list[str]) -> tfds.core.DatasetBuilder:
    """Prepares a manual-dir builder once into `cache_dir()/tfds` (keyed by the manual dir)."""
    import tensorflow_datasets as tfds

    manual_dir = Path(manual_dir)
    missing = [f for f in required if not (manual_dir / f).exists()]
    if missing:
        raise FileNotFoundError(f"{builder_cls.__name__}: {manual_dir} lacks {missing}")
    # One prepared copy per source folder, so two folders never share a stale cache.
    key = str(manual_dir.resolve()).strip("/").replace("/", "_")
    builder = builder_cls(data_dir=str(cache_dir() / "tfds" / key))
    try:
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
    except Exception as e:  # tfds wraps decode/IO errors in many types
        raise ValueError(f"could not prepare {builder_cls.__name__} from {manual_dir}: "
                         f"{type(e).__name__}: {e}") from e
    return builder


def get_builder(name: str, data_dir: str | os.PathLike | None = None
                ) -> tfds.core.DatasetBuilder:
    """The tfds builder of a named source, prepared/extracted as needed (see module doc)."""
    import tensorflow_datasets as tfds

    from tome_jax.tfds_builders import FashionMnistLocal, ImagenetSample

    if name not in NAMES:
        raise ValueError(f"unknown dataset {name!r}; known: {NAMES}")
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir(name)
    if name == "cifar10_jpeg":
        if data_dir.is_dir():
            check_image_folder(data_dir, _CIFAR10_JPEG_COUNTS, CIFAR10_CLASSES)
            return tfds.ImageFolder(str(data_dir))
        return tfds.ImageFolder(str(extract_cifar10_jpeg(data_dir)))
    if name == "image_folder":
        if data_dir is None:
            raise ValueError("image_folder needs data_dir=<root>/<split>/<class>/<image>")
        check_image_folder(data_dir)
        return tfds.ImageFolder(str(data_dir))
    if name == "fashion_mnist_local":
        return _prepared(FashionMnistLocal, data_dir, list(FASHION_MNIST_FILES.values()))
    if name == "imagenet_sample":
        return _prepared(ImagenetSample, data_dir, ["wnids-1000.txt"])
    if name == "imagenet2012":
        # tfds wants ILSVRC2012_img_{train,val}.tar in a manual dir: data_dir is that folder,
        # and the prepared records go to the cache.
        if data_dir is None or not data_dir.is_dir():
            raise FileNotFoundError(
                "imagenet2012 needs data_dir=<folder with ILSVRC2012_img_train.tar and "
                f"ILSVRC2012_img_val.tar> (got {data_dir})")
        builder = tfds.builder(name, data_dir=str(cache_dir() / "tfds"))
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=str(data_dir)))
        return builder
    builder = tfds.builder(name, data_dir=None if data_dir is None else str(data_dir))
    if not builder.is_prepared():
        _require_network(name, builder.data_dir)
        builder.download_and_prepare()
    return builder


_OFFLINE_TWIN = {"cifar10": "cifar10_jpeg", "fashion_mnist": "fashion_mnist_local"}


def _require_network(name: str, where: str, host: str = "storage.googleapis.com") -> None:
    """Fails fast offline: tfds would otherwise retry its downloads for minutes."""
    try:
        socket.getaddrinfo(host, 443)
    except OSError as e:
        raise ConnectionError(
            f"tfds {name!r} is not prepared in {where} and the network is unreachable ({e}); "
            f"offline, use {_OFFLINE_TWIN.get(name, 'an offline source')!r}") from e


def write_image_folder(root: str | os.PathLike, counts: dict[str, int],
                       classes: tuple[str, ...] = ("a", "b", "c"), seed: int = 0,
                       sizes: tuple[tuple[int, int], ...] = ((20, 24), (32, 32), (40, 28))
                       ) -> Path:
    """Writes a small synthetic `<split>/<class>/<n>.jpg` folder (tests, examples); returns it.

    Example i of a split goes to class i % len(classes), with size sizes[i % len(sizes)]
    (h, w), random pixels from `seed`.
    """
    import numpy as np
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, n in counts.items():
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            h, w = sizes[i % len(sizes)]
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            path = root / split / classes[i % len(classes)] / f"{i:05d}.jpg"
            Image.fromarray(pixels).save(path, quality=90)
    return root
