"""Input pipelines: split coverage, per-host sharding, preprocessing, sources, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tome_jax import data, sources

N = 37  # not a multiple of any batch size used here


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return sources.write_image_folder(tmp_path_factory.mktemp("folder"),
                                      {"test": N, "train": 24})


def _all(batches) -> dict[str, np.ndarray]:
    out = list(batches)
    assert len(out) == len(batches)
    return {k: np.concatenate([b[k] for b in out]) for k in out[0]}


def test_eval_batches_cover_split_once(folder):
    batches = data.make_dataset("image_folder", "test", batch_size=8, image_size=16,
                                data_dir=folder)
    assert (batches.num_examples, batches.num_classes, len(batches)) == (N, 3, 5)
    first = next(iter(batches))
    assert first["image"].shape == (8, 16, 16, 3) and first["image"].dtype == np.float32
    assert first["label"].dtype == np.int32 and first["mask"].dtype == bool
    got = _all(batches)
    assert got["mask"].sum() == N
    np.testing.assert_array_equal(got["index"][got["mask"]], np.arange(N))
    assert (got["index"][~got["mask"]] == -1).all()
    assert got["image"].min() >= -1 and got["image"].max() <= 1
    again = _all(batches)  # deterministic order and values
    np.testing.assert_array_equal(again["image"], got["image"])


def test_subsplit(folder):
    got = _all(data.make_dataset("image_folder", "test[5:20]", batch_size=4, image_size=8,
                                 data_dir=folder))
    np.testing.assert_array_equal(got["index"][got["mask"]], np.arange(5, 20))


@pytest.mark.parametrize("count", [1, 2, 3, 8])
def test_process_shares_partition_the_split(folder, count):
    full = _all(data.make_dataset("image_folder", "test", batch_size=6, image_size=8,
                                  data_dir=folder))
    seen, lengths = [], set()
    for i in range(count):
        b = data.make_dataset("image_folder", "test", batch_size=6, image_size=8,
                              data_dir=folder, process_index=i, process_count=count)
        got = _all(b)
        lengths.add(len(b))
        seen.append(got["index"][got["mask"]])
        # Same pixels as the single-process read of the same examples.
        np.testing.assert_array_equal(got["image"][got["mask"]], full["image"][seen[-1]])
    assert len(lengths) == 1  # every process runs the same number of steps
    np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(N))


def test_host_slice():
    for n in (0, 1, 7, 37):
        for p in (1, 2, 3, 8):
            parts = [data.host_slice(n, i, p) for i in range(p)]
            assert parts[0][0] == 0 and parts[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:], strict=False))
            sizes = [b - a for a, b in parts]
            assert max(sizes) - min(sizes) <= 1


def test_normalizations(folder):
    kw = dict(batch_size=N + 3, image_size=16, data_dir=folder)
    unit = next(iter(data.make_dataset("image_folder", "test", normalization="unit", **kw)))
    aug = next(iter(data.make_dataset("image_folder", "test", normalization="augreg", **kw)))
    imn = next(iter(data.make_dataset("image_folder", "test", normalization="imagenet", **kw)))
    m = unit["mask"]
    np.testing.assert_allclose(aug["image"][m], unit["image"][m] * 2 - 1, atol=1e-5)
    expected = (unit["image"][m] - np.array(data.IMAGENET_MEAN)) / np.array(data.IMAGENET_STD)
    np.testing.assert_allclose(imn["image"][m], expected, atol=1e-4)


def test_eval_transform_resizes_short_side_then_center_crops():
    import tensorflow as tf

    # 40 x 80: columns 0..79 carry their own index, so the crop position is visible.
    image = tf.constant(np.broadcast_to(np.arange(80, dtype=np.float32)[None, :, None],
                                        (40, 80, 3)))
    out = data.eval_transform(image, 20, crop=1.0).numpy()
    assert out.shape == (20, 20, 3)
    # short side 40 -> 20 (scale 1/2): width 40, center crop keeps columns 10..29 of 40,
    # i.e. source columns ~20..60.
    assert 19 < out[0, 0, 0] < 23 and 57 < out[0, -1, 0] < 61
    out = data.eval_transform(image, 14, crop=0.875).numpy()  # short side -> 16, crop 14
    assert out.shape == (14, 14, 3)


def test_train_stream_is_seeded_and_augmented(folder):
    kw = dict(batch_size=8, image_size=16, data_dir=folder, train=True)
    a = data.make_dataset("image_folder", "train", shuffle_seed=1, **kw)
    assert len(a) == 3 and a.train
    first = [next(iter(a)) for _ in range(2)]
    np.testing.assert_array_equal(first[0]["image"], first[1]["image"])
    b = next(iter(data.make_dataset("image_folder", "train", shuffle_seed=2, **kw)))
    assert not np.array_equal(first[0]["image"], b["image"])
    assert first[0]["mask"].all() and first[0]["label"].dtype == np.int32
    it = iter(a)
    epochs = [next(it) for _ in range(7)]  # repeats past one epoch of 24 // 8 = 3 batches
    assert all(e["image"].shape == (8, 16, 16, 3) for e in epochs)
    for aug in ("inception", "pad_crop_flip"):
        import tensorflow as tf

        img = tf.zeros((30, 20, 3), tf.uint8)
        out = data.train_transform(img, 16, aug, tf.constant([0, 1], tf.int64))
        assert tuple(out.shape) == (16, 16, 3)


@pytest.mark.parametrize("randaugment", [None, (2, 9.0)])
def test_train_stream_resumes_exactly_at_any_batch(folder, randaugment):
    a = data.make_dataset("image_folder", "train", batch_size=8, image_size=16, data_dir=folder,
                          train=True, shuffle_seed=3, randaugment=randaugment)
    it = iter(a)
    stream = [next(it) for _ in range(8)]  # 3 batches per epoch: crosses two epoch boundaries
    # Every epoch is a permutation of the whole split (each example once).
    epoch_labels = [np.concatenate([b["label"] for b in stream[e * 3:e * 3 + 3]])
                    for e in range(2)]
    assert not np.array_equal(stream[0]["image"], stream[3]["image"])  # reshuffled, re-augmented
    np.testing.assert_array_equal(np.sort(epoch_labels[0]), np.sort(epoch_labels[1]))
    for k in (1, 3, 5):
        resumed = a.iterate_from(k)
        for want in stream[k:k + 3]:
            got = next(resumed)
            np.testing.assert_array_equal(got["image"], want["image"])
            np.testing.assert_array_equal(got["label"], want["label"])


def test_randaugment_changes_images_but_not_order_labels_or_crops(folder):
    kw = dict(batch_size=8, image_size=16, data_dir=folder, train=True, shuffle_seed=3)
    plain = next(iter(data.make_dataset("image_folder", "train", **kw)))
    augmented = next(iter(data.make_dataset("image_folder", "train", randaugment=(2, 9.0), **kw)))
    none = next(iter(data.make_dataset("image_folder", "train", randaugment=(0, 9.0), **kw)))
    np.testing.assert_array_equal(plain["label"], augmented["label"])
    np.testing.assert_array_equal(plain["image"], none["image"])  # crop and flip seeds kept
    differs = [not np.allclose(p, a) for p, a in
              zip(plain["image"], augmented["image"], strict=True)]
    assert sum(differs) >= 5  # identity is one op of 14: a few images may come out unchanged
    with pytest.raises(ValueError, match="magnitude must be in \\[0, 10\\], got 12"):
        data.make_dataset("image_folder", "train", randaugment=(2, 12.0), **kw)


def test_bad_input(folder, tmp_path, monkeypatch):
    monkeypatch.setenv("TOME_JAX_CACHE", str(tmp_path / "cache"))  # keep ~/.cache clean
    with pytest.raises(ValueError, match="unknown dataset 'cifar100'"):
        data.make_dataset("cifar100", "test", batch_size=8, image_size=16)
    with pytest.raises(ValueError, match="unknown normalization"):
        data.make_dataset("image_folder", "test", batch_size=8, image_size=16,
                          data_dir=folder, normalization="clip")
    with pytest.raises(ValueError, match="bad split 'val'"):
        data.make_dataset("image_folder", "val", batch_size=8, image_size=16, data_dir=folder)
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        data.make_dataset("image_folder", "test", batch_size=8, image_size=16,
                          data_dir=tmp_path / "nope")
    with pytest.raises(ValueError, match="needs data_dir"):
        data.make_dataset("image_folder", "test", batch_size=8, image_size=16)
    with pytest.raises(FileNotFoundError, match="archive not found"):
        data.make_dataset("cifar10_jpeg", "test", batch_size=8, image_size=16,
                          data_dir=tmp_path / "missing.tar")
    corrupt = tmp_path / "corrupt.tar"
    corrupt.write_bytes(b"not a tar archive" * 100)
    with pytest.raises(ValueError, match="corrupt CIFAR-10 JPEG archive"):
        data.make_dataset("cifar10_jpeg", "test", batch_size=8, image_size=16,
                          data_dir=corrupt)
    with pytest.raises(ValueError, match="has classes .* expected"):  # not CIFAR-10
        data.make_dataset("cifar10_jpeg", "test", batch_size=8, image_size=16,
                          data_dir=folder)
    with pytest.raises(FileNotFoundError, match="lacks"):
        data.make_dataset("fashion_mnist_local", "test", batch_size=8, image_size=16,
                          data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="ILSVRC2012"):
        data.make_dataset("imagenet2012", "validation", batch_size=8, image_size=16)
    with pytest.raises(ValueError, match="is empty"):
        data.make_dataset("image_folder", "test[3:3]", batch_size=8, image_size=16,
                          data_dir=folder)


def test_network_source_offline_fails_fast(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("no network (simulated)")

    monkeypatch.setattr(sources.socket, "getaddrinfo", offline)
    with pytest.raises(ConnectionError, match="use 'cifar10_jpeg'"):
        data.make_dataset("cifar10", "test", batch_size=8, image_size=32, data_dir=tmp_path)


def test_corrupt_image_is_reported(tmp_path):
    root = sources.write_image_folder(tmp_path / "f", {"test": 4})
    (root / "test" / "a" / "00000.jpg").write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(Exception, match="(?i)jpeg|image|decode"):
        list(data.make_dataset("image_folder", "test", batch_size=2, image_size=8,
                               data_dir=root))


_CIFAR = sources.default_data_dir("cifar10_jpeg")
_FMNIST = Path(sources.FASHION_MNIST_DIR)
_SAMPLE = sources.default_data_dir("imagenet_sample")


@pytest.mark.skipif(not _CIFAR.is_file(), reason=f"CIFAR-10 JPEG archive absent ({_CIFAR}); "
                    "set $TOME_JAX_SHARED")
def test_cifar10_jpeg_real_cache():
    b = data.make_dataset("cifar10_jpeg", "test[:40]", batch_size=16, image_size=32)
    got = _all(b)
    assert b.num_classes == 10 and got["mask"].sum() == 40
    assert set(got["label"][got["mask"]]) <= set(range(10))
    full = data.make_dataset("cifar10_jpeg", "train", batch_size=1000, image_size=32)
    assert full.num_examples == 50_000 and len(full) == 50
    assert data.class_names("cifar10_jpeg") == list(sources.CIFAR10_CLASSES)


@pytest.mark.skipif(not (_FMNIST / "t10k-images-idx3-ubyte.gz").exists(),
                    reason=f"Fashion-MNIST files absent from {_FMNIST} "
                    "(apt-get install -y dataset-fashion-mnist)")
def test_fashion_mnist_local_real_cache():
    b = data.make_dataset("fashion_mnist_local", "test[:40]", batch_size=16, image_size=28)
    got = _all(b)
    assert b.num_classes == 10 and got["mask"].sum() == 40
    img = got["image"][got["mask"]]
    assert img.shape[1:] == (28, 28, 3)
    np.testing.assert_array_equal(img[..., 0], img[..., 2])  # grayscale repeated to RGB
    assert data.make_dataset("fashion_mnist_local", "train", batch_size=100,
                             image_size=28).num_examples == 60_000


@pytest.mark.skipif(not (_SAMPLE / "wnids-1000.txt").exists(),
                    reason=f"ImageNet sample absent ({_SAMPLE}); set $TOME_JAX_SHARED")
def test_imagenet_sample_real_cache():
    b = data.make_dataset("imagenet_sample", "validation", batch_size=32, image_size=32,
                          normalization="imagenet")
    got = _all(b)
    assert b.num_classes == 1000 and got["mask"].sum() == 100
    wnids = (_SAMPLE / "wnids-1000.txt").read_text().split()
    expected = sorted(wnids.index(p.name.split("_")[0]) for p in _SAMPLE.glob("*.JPEG"))
    assert sorted(got["label"][got["mask"]]) == expected
