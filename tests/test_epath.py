"""Object-store paths (gs://): the same code on local epath paths and on a fake bucket.

No bucket is reachable from a test, so `bucket` puts a fake one behind gs:// URLs: an fsspec
filesystem registered for the gs protocol (etils.epath's fsspec backend, as with gcsfs) that
keeps objects in a local folder, refuses appends as object stores do, and names its files
"BUCKET/PATH" as gcsfs does. Orbax's tensorstore writes, which go to GCS by their own driver,
are pointed at the same folder. A call that treats a gs:// URL as a local path would create a
"gs:" folder in the working directory, which each test checks is not there.
"""

import glob as globlib
import importlib
import io
import json
import os
import re
import socket
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath
from etils.epath import backend as epath_backend
from etils.epath import gpath
from fsspec.implementations.local import LocalFileSystem

from tome_jax import checkpoint as ck
from tome_jax import sources, storage
from tome_jax.export import load_exported, save_exported, sidecar_path
from tome_jax.params import flatten, random_params
from tome_jax.tables import read_csv, write_csv
from tome_jax.training.checkpoints import COMMIT_FILE
from tome_jax.training.config import load_config
from tome_jax.training.lock import LOCK_FILE, WorkdirLock, WorkdirLocked
from tome_jax.training.loop import train
from tome_jax.training.manifest import MANIFEST_FILE, check_manifest, write_manifest
from tome_jax.training.metrics import MetricLog
from tome_jax.training.ship import ship
from tome_jax.training.summary import read_metrics
from tome_jax.vit import ViT

TINY = ["dataset=image_folder", "variant=mu/8", "num_classes=3", "image_size=16",
        "batch_size=8", "eval_every=0", "log_every=2", "warmup_steps=2", "r=1", "seed=3",
        "dropout=0.1", "mixup=0.2", "cutmix=0.5", "keep=10"]
CONFIG = {"variant": "mu/4", "num_classes": 3}


class FakeGCS(LocalFileSystem):
    """gs://BUCKET/PATH kept at `root`/BUCKET/PATH; no appends."""

    protocol = ("gs", "gcs")
    root_marker = ""
    cachable = False
    root = ""

    def __init__(self, *args, finalize_on_close=None, **kwargs):
        super().__init__(auto_mkdir=True)

    @classmethod
    def _strip_protocol(cls, path):
        path = os.fspath(path)
        for prefix in ("gs://", "gcs://"):
            path = path.removeprefix(prefix)
        path = path.rstrip("/")
        if path.startswith(cls.root):
            return path
        return f"{cls.root}/{path}" if path else cls.root

    def _name(self, local):
        return local[len(self.root) + 1:] if local.startswith(self.root + "/") else local

    def info(self, path, **kwargs):
        return {**super().info(path, **kwargs), "name": self._name(self._strip_protocol(path))}

    def ls(self, path, detail=False, **kwargs):
        out = super().ls(path, detail=detail, **kwargs)
        if detail:
            return [{**o, "name": self._name(o["name"])} for o in out]
        return [self._name(o) for o in out]

    def glob(self, path, maxdepth=None, **kwargs):
        pattern = self._strip_protocol(path)
        found = globlib.glob(pattern, recursive="**" in pattern)
        if kwargs.get("detail"):
            return {self._name(f): self.info(f) for f in found}
        return [self._name(f) for f in found]

    def _open(self, path, mode="rb", **kwargs):
        if "a" in mode:
            raise NotImplementedError(f"object stores do not append ({path})")
        return super()._open(path, mode=mode, **kwargs)


class _EpathEventWriter:
    """tensorboardX's writer for gs:// (google-cloud-storage there), through epath here."""

    def __init__(self, path):
        self.path, self.buffer = epath.Path(path), io.BytesIO()

    def write(self, data):
        self.buffer.write(data)

    def flush(self):
        self.path.write_bytes(self.buffer.getvalue())

    def close(self):
        self.flush()


class _EpathEventWriterFactory:
    def open(self, path):
        return _EpathEventWriter(path)

    def directory_check(self, path):
        pass


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    """The local folder behind gs://; the test runs in an empty working directory."""
    from orbax.checkpoint._src.path import gcs_utils
    from tensorboardX import record_writer

    root = tmp_path / "store"
    root.mkdir()
    monkeypatch.setattr(FakeGCS, "root", str(root))
    monkeypatch.setenv("EPATH_USE_TF", "0")  # epath's fsspec backend, as without TensorFlow
    # epath caches whether to use TensorFlow on its first remote path: an earlier test that
    # imported TensorFlow would otherwise send gs:// to tf.io.gfile (the real GCS).
    gpath._is_tf_installed.cache_clear()
    registry = importlib.import_module("fsspec.registry")._registry
    for name in ("gs", "gcs"):
        monkeypatch.setitem(registry, name, FakeGCS)
    epath_backend.fsspec_backend._get_filesystem.cache_clear()

    def kvstore(path):
        return {"driver": "file", "path": str(root / str(path).removeprefix("gs://"))}

    monkeypatch.setattr(gcs_utils, "get_kvstore_for_gcs", kvstore)
    monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
    monkeypatch.setitem(record_writer.REGISTERED_FACTORIES, "gs", _EpathEventWriterFactory())
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    yield root
    epath_backend.fsspec_backend._get_filesystem.cache_clear()
    gpath._is_tf_installed.cache_clear()
    assert os.listdir(cwd) == [], "a gs:// URL was used as a local path"


@pytest.fixture(params=["local", "gs"])
def place(request, tmp_path):
    """Where a test writes: a local epath.Path, or a gs:// URL on the fake bucket."""
    if request.param == "local":
        (tmp_path / "local").mkdir()
        return epath.Path(tmp_path / "local")
    request.getfixturevalue("bucket")
    return epath.Path("gs://bucket/place")


def test_as_path():
    assert type(storage.as_path("runs/x")).__name__ == "PosixPath"
    assert type(storage.as_path(epath.Path("/tmp/x"))).__name__ == "PosixPath"
    remote = storage.as_path("gs://b/run")
    assert isinstance(remote, epath.Path) and str(remote / "x") == "gs://b/run/x"
    assert storage.is_remote(remote) and not storage.is_remote("runs/x")
    with pytest.raises(ValueError, match="unsupported URL scheme ftp://"):
        storage.as_path("ftp://host/x")


def test_model_directory_round_trip(place):
    model = ViT(**CONFIG)
    params = random_params(model, 16)
    dst = ck.save_model(place / "m", params, CONFIG, image_size=16, normalization="imagenet",
                        source="random")
    assert str(dst) == str(place / "m")
    assert ck.is_model_dir(str(dst)) and not ck.is_model_dir(str(place))
    loaded, got, info = ck.load_model(str(dst), r=1)
    assert loaded == model.clone(r=1) and info.image_size == (16, 16)
    for name, value in flatten(params).items():
        np.testing.assert_array_equal(np.asarray(flatten(got)[name]), np.asarray(value))
    assert ck.read_info(str(dst)) == info
    with pytest.raises(ck.DestinationExistsError):
        ck.save_model(str(dst), params, CONFIG, image_size=16, normalization="imagenet")
    data = bytearray((dst / ck.PARAMS_FILE).read_bytes())
    data[-1] ^= 1
    (dst / ck.PARAMS_FILE).write_bytes(bytes(data))
    with pytest.raises(ck.CheckpointError, match="checksum mismatch"):
        ck.load_model(str(dst))


def test_remote_model_without_config_is_incomplete(bucket):
    dst = epath.Path("gs://bucket/half")
    (dst / ck.PARAMS_FILE).write_bytes(b"\x80")  # a save cut short before config.json
    assert not ck.is_model_dir(str(dst))
    with pytest.raises(ck.CheckpointError, match="config.json is missing"):
        ck.load_model(str(dst))


def test_manifest(place):
    step = place / "7"
    (step / "state" / "d").mkdir(parents=True)
    (step / "state" / "d" / "ab").write_bytes(b"weights")
    (step / "meta.json").write_text("{}")
    write_manifest(str(step))
    assert json.loads((step / MANIFEST_FILE).read_text())["files"].keys() == {
        "meta.json", "state/d/ab"}
    assert check_manifest(str(step)) is None
    (step / "state" / "d" / "ab").write_bytes(b"garbled")
    assert check_manifest(str(step)) == "state/d/ab differs from its checksum"


def test_lock_on_an_object_store(bucket):
    workdir = "gs://bucket/run"
    lock_object = epath.Path(workdir) / LOCK_FILE
    with WorkdirLock(workdir):
        holder = json.loads(lock_object.read_text())
        assert holder["pid"] == os.getpid() and holder["token"]
        # Overwritten by another run (one alive on another host, as far as it can tell).
        lock_object.write_text(json.dumps({"host": "elsewhere", "pid": 2**22 + 1,
                                           "since": "then"}))
        with pytest.raises(WorkdirLocked,
                           match=f"host elsewhere .*delete {re.escape(str(lock_object))}"):
            WorkdirLock(workdir).acquire()
    assert lock_object.exists()  # not this run's record any more: left alone
    lock_object.unlink()
    # A record of a process of this host that is gone is taken over, with one warning.
    lock_object.write_text(json.dumps({"host": socket.gethostname(), "pid": 2**22 + 1,
                                       "since": "then"}))
    with pytest.warns(UserWarning, match="no longer runs; taking the lock over"):
        with WorkdirLock(workdir):
            pass
    assert not lock_object.exists()


def test_lock_read_back_refuses_a_racing_writer(bucket, monkeypatch):
    lock = WorkdirLock("gs://bucket/run")
    reads = iter([None, {"host": "h", "pid": 1, "since": "now", "token": "theirs"}])
    monkeypatch.setattr(lock, "_read_object", lambda: next(reads))
    with pytest.raises(WorkdirLocked, match="pid 1 on host h"):
        lock.acquire()


def test_metrics_are_rewritten_not_appended(bucket):
    workdir = epath.Path("gs://bucket/run")
    log = MetricLog(workdir)
    for step in (2, 4, 6):
        log.write(step, {"loss": 1.0 / step})
    log.close()
    assert [r["step"] for r in read_metrics("gs://bucket/run")] == [2, 4, 6]
    assert list((workdir / "tb").glob("events.*"))
    log = MetricLog(workdir, start=4)  # resumed from step 4: the row of step 6 goes
    assert [r["step"] for r in read_metrics("gs://bucket/run")] == [2, 4]
    log.write(6, {"loss": 0.5})
    log.close()
    assert [r["step"] for r in read_metrics("gs://bucket/run")] == [2, 4, 6]


def test_csv_round_trip(place):
    rows = [{"r": 0, "acc": 0.5, "name": "a,b"}, {"r": 8, "acc": None, "name": "c"}]
    write_csv(rows, str(place / "t.csv"), ["r", "acc", "name"])
    assert read_csv(str(place / "t.csv"), text=["name"], ints=["r"]) == [
        {"r": 0, "acc": 0.5, "name": "a,b"}, {"r": 8, "acc": None, "name": "c"}]


def test_exported_round_trip(place):
    exported = jax.export.export(jax.jit(lambda x: 2 * x))(
        jax.ShapeDtypeStruct((3,), jnp.float32))
    meta = save_exported(str(place / "f.jaxexport"), exported)
    assert json.loads(sidecar_path(str(place / "f.jaxexport")).read_text()) == meta
    back = load_exported(str(place / "f.jaxexport"))
    np.testing.assert_array_equal(np.asarray(back.call(jnp.ones(3))), np.full(3, 2.0))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return sources.write_image_folder(tmp_path_factory.mktemp("data"),
                                      {"train": 48, "test": 12})


@pytest.mark.slow  # three training runs and a ship: about a minute
def test_train_resume_and_ship_on_a_bucket(bucket, folder, tmp_path):
    cfg = load_config(None, TINY + [f"data_dir={folder}", "steps=4", "save_every=2"])
    workdir = "gs://bucket/run"
    train(cfg, workdir, stop_after=2)
    run = epath.Path(workdir)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["2"]
    assert (run / "checkpoints" / "2" / COMMIT_FILE).exists()  # orbax saw an object store
    assert check_manifest(str(run / "checkpoints" / "2")) is None
    assert not (run / LOCK_FILE).exists()  # released
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the checkpoint restores without a complaint
        resumed = train(cfg, workdir)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["2", "4"]
    assert check_manifest(str(run / "checkpoints" / "4")) is None
    assert [r["step"] for r in read_metrics(workdir)] == [2, 4]
    assert json.loads((run / "config.json").read_text())["steps"] == 4
    # The same run in one go on a local epath.Path ends with the same parameters.
    whole = train(cfg, epath.Path(tmp_path / "local"))
    for a, b in zip(jax.tree.leaves(whole["params"]), jax.tree.leaves(resumed["params"]),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    out, step = ship(workdir, "gs://bucket/model")
    assert step == 4 and str(out) == "gs://bucket/model"
    _, params, _ = ck.load_model("gs://bucket/model")
    for name, value in flatten(params).items():
        np.testing.assert_array_equal(np.asarray(value),
                                      np.asarray(flatten(resumed["params"])[name]))


def test_cli_outputs_on_a_bucket(bucket, folder, tmp_path, capsys):
    """sweep, table, plots and convert called as commands (main(argv)) write to gs:// URLs."""
    from tome_jax.cli import convert as convert_cli
    from tome_jax.cli import plots as plots_cli
    from tome_jax.cli import sweep as sweep_cli
    from tome_jax.cli import table as table_cli
    from tome_jax.sweep import read_csv as read_sweep

    rows = sweep_cli.main(["--random-init", "--variant", "mu/4", "--data", "image_folder",
                           "--data-dir", str(folder), "--split", "test", "--image-size", "16",
                           "--batch-size", "4", "--runs", "0", "--no-progress", "--r", "0", "2",
                           "--out", "gs://bucket/sweeps/a"])
    sweeps = epath.Path("gs://bucket/sweeps")
    assert sorted(p.name for p in sweeps.iterdir()) == ["a.csv", "a.md", "a.png"]
    assert [row["r"] for row in read_sweep("gs://bucket/sweeps/a.csv")] == ["0", "2"]
    assert [row["tokens"] for row in read_sweep("gs://bucket/sweeps/a.csv")] == [
        row["tokens"] for row in rows]
    assert (sweeps / "a.png").read_bytes().startswith(b"\x89PNG")
    capsys.readouterr()
    text = table_cli.main(["A=gs://bucket/sweeps/a.csv", "--r", "2",
                           "--out", "gs://bucket/tables/t.md"])
    assert epath.Path("gs://bucket/tables/t.md").read_text() == text + "\n"
    assert "| A |" in text
    plots_cli.main(["gs://bucket/sweeps/a.csv", "gs://bucket/plots/a.pdf"])
    assert epath.Path("gs://bucket/plots/a.pdf").read_bytes().startswith(b"%PDF")

    src = tmp_path / "src.npz"
    model = ViT(**CONFIG)
    params = flatten(random_params(model, 16))
    np.savez(src, **{k: np.asarray(v) for k, v in params.items()})
    capsys.readouterr()
    assert convert_cli.main([str(src), "gs://bucket/models/m"]) == 0
    assert json.loads(capsys.readouterr().out)["dst"] == "gs://bucket/models/m"
    _, got, info = ck.load_model("gs://bucket/models/m")
    assert info.image_size == (16, 16)
    for name, value in flatten(got).items():
        np.testing.assert_array_equal(np.asarray(value), params[name])
    # An existing destination is the one-line user error, exit status 2, as locally.
    assert convert_cli.main([str(src), "gs://bucket/models/m"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m tome_jax.convert: error: ") and err.count("\n") == 1
    assert "gs://bucket/models/m" in err


def test_config_file_and_ship_log_on_a_bucket(bucket):
    from tome_jax.training.ship import LOG_FILE, log_path

    (epath.Path("gs://bucket/run") / "config.json").write_text(
        json.dumps({"variant": "mu/4", "steps": 7}))
    cfg = load_config("gs://bucket/run/config.json", ["seed=2"])
    assert (cfg.variant, cfg.steps, cfg.seed) == ("mu/4", 7, 2)
    with pytest.raises(FileNotFoundError, match="config file gs://bucket/none.json not found"):
        load_config("gs://bucket/none.json", [])
    # A logging.FileHandler writes local files: a bucket workdir's log goes to a local folder.
    local = log_path("gs://bucket/run")
    assert local == storage.local_log_dir("gs://bucket/run") / LOG_FILE
    assert local.parent.is_dir() and not storage.is_remote(local)
    assert log_path("runs/x") == storage.as_path("runs/x") / LOG_FILE


def test_figure_and_logits_on_a_bucket(bucket):
    from tome_jax.cli.evaluate import save_npz
    from tome_jax.vis import render_grid

    panel = np.zeros((8, 8, 3), np.uint8)
    assert str(render_grid([[("r = 0", panel)]], "gs://bucket/vis/m.png")) == (
        "gs://bucket/vis/m.png")
    assert epath.Path("gs://bucket/vis/m.png").read_bytes().startswith(b"\x89PNG")
    save_npz("gs://bucket/logits", logits=np.eye(2), index=np.arange(2))
    with epath.Path("gs://bucket/logits.npz").open("rb") as f:
        np.testing.assert_array_equal(np.load(io.BytesIO(f.read()))["logits"], np.eye(2))
