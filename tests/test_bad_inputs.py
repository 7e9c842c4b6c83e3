"""Bad inputs a user can hand the project, each refused with one line that names the file:
garbled model directories and exported artefacts, full disks, broken checkpoints to convert,
and image folders with files that do not decode (or decode to the wrong picture)."""

import errno
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tome_jax import checkpoint as ck
from tome_jax import export, image_files, memory_data
from tome_jax.cli.convert import main as convert_main
from tome_jax.convert import convert
from tome_jax.params import flatten

REPO = Path(__file__).resolve().parents[1]
SHIPPED_MODEL = REPO / "models" / "cifar10_vit"
SHIPPED_IMAGES = REPO / "data" / "cifar10-test-1000" / "test"
ENOSPC = os.strerror(errno.ENOSPC)  # "No space left on device"
PROG = "python -m tome_jax.convert"  # convert_main called directly, not under tome-jax


def at(path) -> str:
    return re.escape(str(path))


def one_line(text: str) -> str:
    assert "\n" not in text.strip(), text
    return text.strip()


@pytest.fixture
def disk_full(monkeypatch):
    """Every fsync reports ENOSPC, as a full disk does for data still in the page cache."""

    def fsync(fd):
        raise OSError(errno.ENOSPC, ENOSPC)

    monkeypatch.setattr(os, "fsync", fsync)


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A real 1 MiB tmpfs (needs root; skipped where mounting is not allowed)."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if proc.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


# --------------------------------------------------------------------------------------------
# Model directories: checksums of params.msgpack and of the "model" object.


def test_garbled_shipped_params_are_refused(tmp_path):
    d = tmp_path / "cifar10_vit"
    shutil.copytree(SHIPPED_MODEL, d)
    data = bytearray((d / ck.PARAMS_FILE).read_bytes())
    mid = len(data) // 2
    data[mid:mid + 64] = np.random.default_rng(0).integers(0, 256, 64, np.uint8).tobytes()
    (d / ck.PARAMS_FILE).write_bytes(data)
    expected = json.loads((SHIPPED_MODEL / ck.CONFIG_FILE).read_text())["sha256"]
    with pytest.raises(ck.CheckpointError) as e:
        ck.load_model(d)
    assert one_line(str(e.value)) == (
        f"{d / ck.PARAMS_FILE}: checksum mismatch (expected {expected[ck.PARAMS_FILE]}, got "
        f"{ck.sha256_hex(bytes(data))}); the file is corrupt")


def test_shipped_directory_records_its_checksums_and_loads():
    meta = json.loads((SHIPPED_MODEL / ck.CONFIG_FILE).read_text())
    params = (SHIPPED_MODEL / ck.PARAMS_FILE).read_bytes()
    assert meta["sha256"] == ck.checksums(params, meta["model"])
    _, _, info = ck.load_model(SHIPPED_MODEL)
    assert info.image_size == (32, 32)


def test_edited_model_object_is_refused(tmp_path):
    d = tmp_path / "m"
    shutil.copytree(SHIPPED_MODEL, d)
    meta = json.loads((d / ck.CONFIG_FILE).read_text())
    meta["model"]["pool"] = "gap"  # every shape still fits: only the digest notices
    (d / ck.CONFIG_FILE).write_text(json.dumps(meta))
    for load in (ck.load_model, ck.read_info):
        with pytest.raises(ck.CheckpointError,
                           match=f"^{at(d / ck.CONFIG_FILE)}: checksum mismatch of its \"model\""):
            load(d)


def test_save_model_records_checksums(tmp_path):
    params = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    d = ck.save_model(tmp_path / "m", params, {"variant": "mu/4"}, image_size=16,
                      normalization="augreg")
    meta = json.loads((d / ck.CONFIG_FILE).read_text())
    assert meta["sha256"] == {ck.PARAMS_FILE: ck.sha256_hex((d / ck.PARAMS_FILE).read_bytes()),
                              "model": ck.model_digest({"variant": "mu/4"})}


# --------------------------------------------------------------------------------------------
# Full disks: one line with the path and the system's reason, nothing half-written left.


def test_save_model_on_a_full_disk_injected(tmp_path, disk_full):
    dst = tmp_path / "m"
    with pytest.raises(ck.CheckpointError) as e:
        ck.save_model(dst, {"w": np.zeros(3)}, {"variant": "mu/4"}, image_size=16,
                      normalization="augreg")
    assert isinstance(e.value, OSError) and e.value.errno == errno.ENOSPC
    assert one_line(str(e.value)) == f"cannot write {dst}: {ENOSPC} (nothing was written there)"
    assert list(tmp_path.iterdir()) == []


def _shipped_as_npz(path: Path) -> Path:
    """The shipped model's params as a big_vision-style .npz (4.8 MB), a convert source."""
    _, params, _ = ck.load_model(SHIPPED_MODEL)
    np.savez(path, **{k: np.asarray(v) for k, v in flatten(params).items()})
    return path


def test_convert_to_a_full_tmpfs(tmp_path, tiny_tmpfs, capsys):
    src = _shipped_as_npz(tmp_path / "shipped.npz")
    dst = tiny_tmpfs / "m"
    assert convert_main([str(src), str(dst)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert one_line(err) == (
        f"{PROG}: error: cannot write {dst}: {ENOSPC} (nothing was written there)")
    assert list(tiny_tmpfs.iterdir()) == []
    # Direct library call: a CheckpointError that is also the OSError it was.
    with pytest.raises(OSError, match=f"^cannot write {at(dst)}: {ENOSPC}"):
        convert(src, dst)


def test_convert_to_a_full_disk_injected(tmp_path, disk_full, capsys):
    src = _shipped_as_npz(tmp_path / "shipped.npz")
    assert convert_main([str(src), str(tmp_path / "m")]) == 2
    assert one_line(capsys.readouterr().err) == (
        f"{PROG}: error: cannot write {tmp_path / 'm'}: {ENOSPC} (nothing was written there)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shipped.npz"]


class _Serialized:
    """Stands in for a jax.export.Exported: only serialize() is used by save_exported."""

    def __init__(self, data: bytes):
        self.data = data

    def serialize(self) -> bytes:
        return self.data


def test_save_exported_on_a_full_disk(tmp_path, tiny_tmpfs, monkeypatch):
    # Real: 2 MB of artefact on a 1 MiB tmpfs.
    out = tiny_tmpfs / "model.jaxexport"
    with pytest.raises(export.ExportError) as e:
        export.save_exported(out, _Serialized(b"\x01" * (2 << 20)))
    assert one_line(str(e.value)) == f"cannot write {out}: {ENOSPC} (nothing was written there)"
    assert list(tiny_tmpfs.iterdir()) == []
    # Injected, over an existing artefact with overwrite=True: the old pair stays intact.
    disk = tmp_path / "disk"
    out = disk / "model.jaxexport"
    export.save_exported(out, _Serialized(b"old"))
    before = {p.name: p.read_bytes() for p in disk.iterdir()}

    def fsync(fd):
        raise OSError(errno.ENOSPC, ENOSPC)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(export.ExportError, match=f"^cannot write {at(out)}: {ENOSPC}"):
        export.save_exported(out, _Serialized(b"new"), overwrite=True)
    assert {p.name: p.read_bytes() for p in disk.iterdir()} == before


# --------------------------------------------------------------------------------------------
# Exported artefacts: checked against the sidecar's sha256; never overwritten silently.


def test_two_flipped_bytes_in_an_artefact_are_refused(tmp_path):
    out = tmp_path / "model.jaxexport"
    export.save_exported(out, _Serialized(bytes(range(256)) * 4))
    data = bytearray(out.read_bytes())
    data[500] ^= 0x01
    data[501] ^= 0x80
    out.write_bytes(data)
    want = json.loads(export.sidecar_path(out).read_text())["sha256"]
    with pytest.raises(export.ExportError) as e:
        export.load_exported(out)
    assert one_line(str(e.value)) == (
        f"{out}: checksum mismatch (expected {want}, got {ck.sha256_hex(bytes(data))}); the "
        "file is corrupt")
    with pytest.raises(export.ExportError, match="exists; refusing to overwrite"):
        export.save_exported(out, _Serialized(b"other"))
    assert out.read_bytes() == data


# --------------------------------------------------------------------------------------------
# Converting: broken sources name the file and what is wrong, on stderr.


def test_convert_errors_name_the_file(tmp_path, capsys):
    from safetensors.numpy import save_file

    qkv = tmp_path / "qkv.safetensors"
    save_file({"patch_embed.proj.weight": np.zeros((8, 3, 4, 4), np.float32),
               "pos_embed": np.zeros((1, 5, 8), np.float32),
               "blocks.0.attn.qkv.weight": np.zeros((10, 8), np.float32)}, str(qkv))
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    no_pos = tmp_path / "no_pos.npz"
    np.savez(no_pos, **{"embedding/kernel": np.zeros((4, 4, 3, 8), np.float32)})
    cases = {
        qkv: f"{qkv}: blocks.0.attn.qkv.weight has shape (10, 8): a fused qkv tensor needs rows "
             "that split into 3 equal parts (query, key, value)",
        empty: f"{empty} is empty (0 bytes)",
        no_pos: f"{no_pos}: no position embeddings in the .npz: neither "
                "'Transformer/posembed_input/pos_embedding' (AugReg) nor 'pos_embedding' "
                "(big_vision) is there",
    }
    for src, message in cases.items():
        with pytest.raises(ck.CheckpointError) as e:
            convert(src)
        assert str(e.value) == message
        dst = tmp_path / f"out_{src.stem}"
        assert convert_main([str(src), str(dst)]) == 2
        out, err = capsys.readouterr()
        assert out == "" and one_line(err) == f"{PROG}: error: {message}"
        assert not dst.exists()


# --------------------------------------------------------------------------------------------
# Image folders with bad files, read by tf.data (tome_jax.data) and by PIL (memory_data).

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck")  # all ten, as the shipped model's head has
PER_CLASS = {c: 6 if c in ("cat", "dog") else 2 for c in CLASSES}
COPIES = sum(PER_CLASS.values())  # 28


def _garble(path: Path, pattern: bytes) -> None:
    """Overwrites len(pattern) bytes in the middle of a JPEG's entropy-coded data."""
    data = path.read_bytes()
    mid = (data.find(b"\xff\xda") + len(data)) // 2
    path.write_bytes(data[:mid] + pattern + data[mid + len(pattern):])


def _copy_images(root: Path) -> Path:
    """root/test/<class>/NNNN.jpg: COPIES of the shipped CIFAR-10 test images."""
    for c, n in PER_CLASS.items():
        (root / "test" / c).mkdir(parents=True)
        for i in range(n):
            shutil.copy(SHIPPED_IMAGES / c / f"{i:04d}.jpg", root / "test" / c)
    return root


def _silent_garble(root: Path) -> Path:
    """16 zero bytes inside dog/0002.jpg's scan: still decodes, to another picture."""
    path = root / "test" / "dog" / "0002.jpg"
    _garble(path, b"\x00" * 16)
    return path


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory):
    """COPIES copies (one garbled so that decoders reject it, one garbled so that it still
    decodes) plus 3 bad files."""
    root = _copy_images(tmp_path_factory.mktemp("bad_images"))
    test = root / "test"
    _garble(test / "cat" / "0001.jpg", b"\xff" * 16)  # decoders reject it
    (test / "cat" / "empty.jpg").write_bytes(b"")
    (test / "cat" / "text.jpg").write_text("these are not the pixels you are looking for\n")
    good = (SHIPPED_IMAGES / "dog" / "0009.jpg").read_bytes()
    (test / "dog" / "truncated.jpg").write_bytes(good[:len(good) // 2])
    _silent_garble(root)
    bad = {str(test / "cat" / "0001.jpg"): "not a decodable image",
           str(test / "cat" / "empty.jpg"): "empty file (0 bytes)",
           str(test / "cat" / "text.jpg"): "not an image (no known image format)",
           str(test / "dog" / "truncated.jpg"): "not a decodable image"}
    return root, bad


@pytest.fixture(scope="module")
def manifest_folder(tmp_path_factory):
    """Good copies with a SHA256SUMS written before one of them was garbled (it decodes)."""
    root = _copy_images(tmp_path_factory.mktemp("manifest_images"))
    image_files.write_manifest(root)
    return root, _silent_garble(root)


def _bad_message_re(bad: dict[str, str], more: int) -> str:
    paths = "|".join(re.escape(p) for p in bad)
    return (fr"^({paths}): (not a decodable image \(.+\)|empty file \(0 bytes\)|not an image "
            fr"\(no known image format\)); {more} more bad image\(s\) in .+; --skip-bad-images "
            r"\(skip_bad_images=True\) leaves them out and lists them$")


def test_memory_data_names_the_first_bad_file(bad_folder):
    root, bad = bad_folder
    with pytest.raises(image_files.BadImageError) as e:
        memory_data.read_image_folder(root, "test", 32)
    message = one_line(str(e.value))
    assert message.startswith(f"{root / 'test' / 'cat' / '0001.jpg'}: not a decodable image (")
    assert re.match(_bad_message_re(bad, 3), message)


def test_memory_data_skips_and_lists_bad_files(bad_folder):
    root, bad = bad_folder
    split = memory_data.read_image_folder(root, "test", 32, skip_bad_images=True)
    assert split.images.shape == (COPIES - 1, 32, 32, 3)  # all copies but the rejected one
    assert {b.path for b in split.skipped} == set(bad)
    for b in split.skipped:
        assert b.reason.startswith(bad[b.path])


def test_tf_data_names_a_bad_file_in_one_line(bad_folder):
    from tome_jax import data

    root, bad = bad_folder
    for train in (False, True):
        batches = data.make_dataset("image_folder", "test", batch_size=4, image_size=32,
                                    data_dir=root, train=train)
        with pytest.raises(image_files.BadImageError) as e:
            for _ in zip(range(2 * len(batches)), iter(batches), strict=False):
                pass
        assert re.match(_bad_message_re(bad, 3), one_line(str(e.value)))


def test_tf_data_skips_and_lists_bad_files(bad_folder):
    from tome_jax import data

    root, bad = bad_folder
    batches = data.make_dataset("image_folder", "test", batch_size=5, image_size=32,
                                data_dir=root, skip_bad_images=True)
    assert {b.path for b in batches.skipped} == set(bad)
    for b in batches.skipped:
        assert b.reason.startswith(bad[b.path])
    assert batches.num_examples == COPIES - 1
    rows = list(batches)
    assert sum(int(b["mask"].sum()) for b in rows) == COPIES - 1
    assert sorted(np.concatenate([b["index"][b["mask"]] for b in rows])) == list(
        range(COPIES - 1))


def test_silently_garbled_jpeg_is_caught_by_the_manifest(manifest_folder):
    """Decoders accept 16 zeroed bytes in the scan (a different picture): the manifest's
    sha256 is what catches them, in both readers."""
    from tome_jax import data

    root, garbled = manifest_folder
    assert image_files.decode_problem(garbled.read_bytes()) is None
    assert data.decode_problem(garbled.read_bytes()) is None
    reason = (r"checksum mismatch with SHA256SUMS \(expected [0-9a-f]{64}, got "
              r"[0-9a-f]{64}\); the file is corrupt")
    with pytest.raises(image_files.BadImageError, match=f"^{at(garbled)}: {reason}; --skip"):
        memory_data.read_image_folder(root, "test", 32)
    with pytest.raises(image_files.BadImageError, match=f"^{at(garbled)}: {reason}; --skip"):
        data.make_dataset("image_folder", "test", batch_size=4, image_size=32, data_dir=root)
    split = memory_data.read_image_folder(root, "test", 32, skip_bad_images=True)
    assert [b.path for b in split.skipped] == [str(garbled)]
    assert len(split.labels) == COPIES - 1
    batches = data.make_dataset("image_folder", "test", batch_size=4, image_size=32,
                                data_dir=root, skip_bad_images=True)
    assert [b.path for b in batches.skipped] == [str(garbled)]
    assert batches.num_examples == COPIES - 1
    (root / image_files.MANIFEST).rename(root / "moved")
    try:  # without the manifest the garbled copy is read like any other
        assert len(memory_data.read_image_folder(root, "test", 32).labels) == COPIES
    finally:
        (root / "moved").rename(root / image_files.MANIFEST)


def test_read_manifest_accepts_sha256sum_output(tmp_path):
    root = _copy_images(tmp_path)
    written = image_files.read_manifest(image_files.write_manifest(root).parent)
    assert len(written) == COPIES and "test/cat/0000.jpg" in written
    if shutil.which("sha256sum"):
        proc = subprocess.run("sha256sum ./test/*/*.jpg", shell=True, cwd=root,
                              capture_output=True, text=True, check=True)
        (root / image_files.MANIFEST).write_text(proc.stdout)
        assert image_files.read_manifest(root) == written
    (root / image_files.MANIFEST).write_text("not a digest line\n")
    with pytest.raises(ValueError, match=f"^{at(root / image_files.MANIFEST)}:1 is not"):
        image_files.read_manifest(root)


@pytest.mark.parametrize("reader", ["tf", "pil"])
def test_evaluate_cli_refuses_or_skips_bad_images(bad_folder, reader, capsys, monkeypatch):
    """The shipped model over the bad folder: one `error:` line naming a bad file, or, with
    --skip-bad-images, a score over the usable images with the 4 bad ones listed."""
    from tome_jax import inputs
    from tome_jax.cli import evaluate as cli

    root, bad = bad_folder
    if reader == "pil":  # the reader used where TensorFlow is not installed
        monkeypatch.setattr(inputs, "has_tensorflow", lambda: False)
    args = ["--data", "image_folder", "--data-dir", str(root), "--split", "test",
            "--checkpoint", str(SHIPPED_MODEL), "--batch-size", "8"]
    with pytest.raises(SystemExit) as e:
        cli.main(args)
    assert e.value.code == 2
    err = one_line(capsys.readouterr().err.strip().splitlines()[-1])
    assert re.match(_bad_message_re(bad, 3).replace("^", r"^\S.*: error: ", 1), err), err
    result = cli.main([*args, "--skip-bad-images", "--json"])
    assert result["count"] == COPIES - 1
    assert sorted(s.split(": ")[0] for s in result["skipped_images"]) == sorted(bad)
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["skipped_images"] == result["skipped_images"]


def test_sweep_cli_skips_bad_images(bad_folder, tmp_path, capsys):
    from tome_jax.cli import sweep as cli

    root, bad = bad_folder
    rows = cli.main(["--checkpoint", str(SHIPPED_MODEL), "--data", "image_folder", "--data-dir",
                     str(root), "--split", "test", "--batch-size", "8", "--r", "0", "--runs",
                     "0", "--no-progress", "--skip-bad-images", "--out", str(tmp_path / "s")])
    assert rows[0]["count"] == COPIES - 1
    header = (tmp_path / "s.md").read_text().splitlines()[0]
    assert "skipped 4 bad image(s): " in header
    assert all(path in header for path in bad)
    assert "skipped 4 bad image(s)" in capsys.readouterr().out
