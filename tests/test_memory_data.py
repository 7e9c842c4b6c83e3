"""The device-resident input pipeline: decoding, the batch stream, its augmentation, bad input."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tome_jax import data, memory_data, sharding, sources

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_IMAGES = ROOT / "data" / "cifar10-test-1000"
N = 37


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    # 32 x 32 only, as CIFAR (other sizes are resized, tested by the tar/folder test's shapes).
    return sources.write_image_folder(tmp_path_factory.mktemp("folder"), {"test": N, "train": 24},
                                      sizes=((32, 32),))


def test_folder_and_compressed_tar_read_the_same(folder, tmp_path):
    archive = tmp_path / "split.tar.xz"
    with tarfile.open(archive, "w:xz") as tar:
        tar.add(folder, arcname="prefix")  # members under a prefix folder, as archives often are
    a = memory_data.read_image_folder(folder, "test", 32)
    b = memory_data.read_image_folder(archive, "test", 32)
    assert a.images.shape == (N, 32, 32, 3) and a.images.dtype == np.uint8
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.class_names == b.class_names == ("a", "b", "c")
    # write_image_folder puts example i in class i % 3.
    np.testing.assert_array_equal(np.bincount(a.labels), [13, 12, 12])


def test_pixels_and_labels_match_the_tfds_pipeline():
    # The 1,000 real CIFAR-10 test JPEGs shipped in data/. PIL decodes with libjpeg's accurate
    # integer IDCT, tf.image.decode_image with its fast one: pixels differ by about one level
    # on average (measured: mean |diff| 0.99, at most 5). Evaluated both ways, the shipped model
    # scores 79.02% (PIL, on the GPU) and 79.03% (tf.data, on the CPU).
    mine = memory_data.read_image_folder(SHIPPED_IMAGES, "test", 32)
    batches = data.make_dataset("image_folder", "test", batch_size=1000, image_size=32,
                                data_dir=SHIPPED_IMAGES, normalization="unit")
    ref = next(iter(batches))
    assert ref["mask"].all() and len(mine.labels) == 1000
    ref_images = np.round(ref["image"] * 255).astype(np.int16).reshape(1000, -1)
    ref_labels = ref["label"]
    assert np.array_equal(np.bincount(ref_labels), np.bincount(mine.labels))
    # tfds.ImageFolder reads in its own order: pair each image with its nearest tfds image.
    for image, label in zip(mine.images.astype(np.int16).reshape(1000, -1), mine.labels,
                            strict=True):
        diffs = np.abs(ref_images - image)
        best = int(diffs.mean(1).argmin())
        assert diffs[best].mean() < 2 and diffs[best].max() <= 6 and ref_labels[best] == label


def test_normalizations_match_the_host_pipeline():
    pixels = np.random.default_rng(0).integers(0, 256, (4, 5, 3)).astype(np.uint8)
    for key in data.NORMALIZATIONS:
        host = data.normalize(pixels.astype(np.float32), key).numpy()
        np.testing.assert_allclose(memory_data.normalize(pixels, key), host, rtol=1e-6)
        np.testing.assert_allclose(memory_data.normalize(jnp.asarray(pixels), key), host,
                                   rtol=1e-6)


def _numpy_candidates(image: np.ndarray, pad: int) -> np.ndarray:
    """Every crop (and its mirror) of the reflect-padded image: [(2p+1)^2 * 2, S, S, 3]."""
    size = image.shape[0]
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    crops = [padded[y:y + size, x:x + size] for y in range(2 * pad + 1)
             for x in range(2 * pad + 1)]
    return np.stack(crops + [c[:, ::-1] for c in crops])


def test_stream_is_a_permutation_per_epoch_of_cropped_flipped_images(folder):
    split = memory_data.read_image_folder(folder, "train", 32)
    mesh = sharding.batch_mesh(jax.devices()[:1])
    stream = memory_data.DeviceStream(split, batch_size=8, mesh=mesh, seed=5,
                                      normalization="unit")
    assert stream.steps_per_epoch == 3
    candidates = [_numpy_candidates(src, 4).reshape(162, -1) for src in split.images]
    seen, flipped, shifted = [], 0, 0
    for step in range(3):  # one epoch
        batch = jax.device_get(stream.batch(step))
        assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.float32
        for image, label in zip(np.round(batch["image"] * 255).astype(np.uint8),
                                batch["label"], strict=True):
            # Which source is it? The one with this exact crop (or mirror) among its candidates.
            hits = [(i, int(np.flatnonzero((c == image.reshape(-1)).all(1))[0]))
                    for i, c in enumerate(candidates) if (c == image.reshape(-1)).all(1).any()]
            assert len(hits) == 1, "each batch image is exactly one crop/flip of one source"
            source, which = hits[0]
            assert split.labels[source] == label
            seen.append(source)
            flipped += which >= 81
            shifted += which % 81 != 40  # 40: the centred crop
    assert sorted(seen) == list(range(24)), "an epoch visits every example once"
    assert 0 < flipped < 24 and shifted > 12  # the augmentation is actually random


def test_stream_batches_are_a_pure_function_of_seed_and_step(folder):
    split = memory_data.read_image_folder(folder, "train", 32)
    mesh = sharding.batch_mesh(jax.devices()[:1])
    a = memory_data.DeviceStream(split, batch_size=8, mesh=mesh, seed=1)
    b = memory_data.DeviceStream(split, batch_size=8, mesh=mesh, seed=1)
    c = memory_data.DeviceStream(split, batch_size=8, mesh=mesh, seed=2)
    resumed = memory_data.iterate(b, 4)
    for step in (4, 5, 6):  # crosses into the third epoch (3 batches per epoch)
        np.testing.assert_array_equal(a.batch(step)["image"], next(resumed)["image"])
    assert not np.array_equal(a.batch(4)["image"], c.batch(4)["image"])
    assert not np.array_equal(a.batch(1)["image"], a.batch(4)["image"])  # epochs differ


STREAM_ON_DEVICES = """
import sys, numpy as np, jax
from tome_jax import memory_data, sharding
split = memory_data.read_image_folder(sys.argv[1], "train", 32)
out = {}
for n in (1, 8):
    mesh = sharding.batch_mesh(jax.devices()[:n])
    stream = memory_data.DeviceStream(split, batch_size=8, mesh=mesh, seed=3)
    batch = stream.batch(7)
    assert len(batch["image"].sharding.device_set) == n
    out[n] = jax.device_get(batch)
for k in ("image", "label"):
    np.testing.assert_array_equal(out[1][k], out[8][k])
print("TF", "tensorflow" in sys.modules)
"""


def test_same_batches_on_1_and_8_devices_without_tensorflow(folder):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = subprocess.run([sys.executable, "-c", STREAM_ON_DEVICES, str(folder)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "TF False" in proc.stdout  # the device pipeline runs where TensorFlow is absent


def test_eval_batches_cover_the_split_once_over_processes(folder):
    split = memory_data.read_image_folder(folder, "test", 32)
    seen, lengths = [], set()
    for p in range(3):
        batches = memory_data.eval_batches(split, 8, process_index=p, process_count=3)
        lengths.add(len(batches))
        for b in batches:
            assert b["image"].shape == (3, 32, 32, 3)  # ceil(8 / 3) rows per process
            idx = b["index"][b["mask"]]
            np.testing.assert_array_equal(b["label"][b["mask"]], split.labels[idx])
            np.testing.assert_allclose(b["image"][b["mask"]],
                                       split.images[idx] / 127.5 - 1, atol=1e-6)
            assert (b["index"][~b["mask"]] == -1).all()
            seen.extend(idx.tolist())
    assert len(lengths) == 1
    assert sorted(seen) == list(range(N))


def test_bad_sources_are_named(folder, tmp_path):
    with pytest.raises(ValueError, match="no split folder 'validation'"):
        memory_data.read_image_folder(folder, "validation", 32)
    broken = tmp_path / "broken.tar.xz"
    broken.write_bytes(b"\xfd7zXZ\x00 definitely not a whole archive")
    with pytest.raises(ValueError, match="corrupt or unreadable archive"):
        memory_data.read_image_folder(broken, "train", 32)
    with pytest.raises(FileNotFoundError):
        memory_data.read_image_folder(tmp_path / "missing.tar", "train", 32)
    (tmp_path / "empty" / "train" / "x").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images under split 'train'"):
        memory_data.read_image_folder(tmp_path / "empty", "train", 32)
    bad = tmp_path / "bad"
    (bad / "train" / "x").mkdir(parents=True)
    (bad / "train" / "x" / "0.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match=f"^{re.escape(str(bad / 'train' / 'x' / '0.jpg'))}: "
                                         r"not an image \(no known image format\)"):
        memory_data.read_image_folder(bad, "train", 32)
    split = memory_data.read_image_folder(folder, "train", 32)
    mesh = sharding.batch_mesh(jax.devices()[:1])
    with pytest.raises(ValueError, match="batch_size 25 needs 1..24"):
        memory_data.DeviceStream(split, batch_size=25, mesh=mesh)
    with pytest.raises(ValueError, match="unknown normalization"):
        memory_data.DeviceStream(split, batch_size=8, mesh=mesh, normalization="bogus")
