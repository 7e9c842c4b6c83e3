"""The model directory: DIR/params.msgpack (float32 params) + DIR/config.json.

params.msgpack may hold float16 matrices (`save_model(param_dtype="float16")`, half the file of
a large model); every load reads them back as float32.

config.json:
    {"model": {ViT fields}, "image_size": [H, W], "normalization": "augreg",
     "source": "where the weights came from", "format": "tome_jax.checkpoint/2",
     "sha256": {"params.msgpack": hex digest of the file, "model": hex digest of the "model"
                object as canonical JSON}}

Every load verifies both digests, so a corrupt or replaced params file (or an edited "model"
object) is refused instead of loaded with wrong weights; a directory written before the digests
existed has nothing to verify and loads as before.

Written by `python -m tome_jax.convert` and `python -m train.ship`; read by every command.
DIR may be an object-store URL (gs://bucket/model, through `etils.epath`); there config.json is
written last, so a directory without it is incomplete and is not loaded.

    save_model(dst, params, {"variant": "S/16", "num_classes": 10}, image_size=224,
               normalization="augreg")
    model, params, info = load_model(dst, r=8)
    logits, out = model.apply({"params": params}, images_nhwc)  # info.normalization's inputs
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tome_jax import normalization as norm
from tome_jax.params import abstract_params, flatten, unflatten
from tome_jax.storage import AnyPath, as_path, is_remote

if TYPE_CHECKING:
    from tome_jax.vit import ViT

PARAMS_FILE = "params.msgpack"
CONFIG_FILE = "config.json"
FORMAT = "tome_jax.checkpoint/2"
# Directories written before config.json named its normalization ("tome_jax.convert/1")
# were all read with AugReg's [-1, 1] inputs, and without an image size at 224 px.
LEGACY_NORMALIZATION = "augreg"
DEFAULT_IMAGE_SIZE = 224


class CheckpointError(ValueError):
    """A checkpoint or model directory that cannot be used (wrong format, corrupt, unsafe,
    parameters that do not fit the model)."""


class DestinationExistsError(CheckpointError, FileExistsError):
    """save_model's destination already exists (also a FileExistsError, as it always was)."""


class WriteError(CheckpointError, OSError):
    """save_model could not write (disk full, no permission); also an OSError with its errno."""


CHECKSUMS = "sha256"  # the config.json key holding the digests


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def model_digest(model_config: Any) -> str:
    """sha256 of the "model" object as canonical JSON (sorted keys, no spaces)."""
    text = json.dumps(model_config, sort_keys=True, separators=(",", ":"))
    return sha256_hex(text.encode())


def checksums(params_bytes: bytes, model_config: dict[str, Any]) -> dict[str, str]:
    """The "sha256" entry of config.json for these params bytes and "model" object."""
    return {PARAMS_FILE: sha256_hex(params_bytes), "model": model_digest(model_config)}


PARAM_DTYPES = ("float32", "float16")


def stored_params(params: Mapping[str, Any], param_dtype: str = "float32"
                  ) -> dict[str, np.ndarray]:
    """Flat {"a/b/c": array} as save_model writes them: float32, or with param_dtype "float16"
    every tensor of >= 2 dimensions as float16 (vectors stay float32)."""
    if param_dtype not in PARAM_DTYPES:
        raise ValueError(f"param_dtype {param_dtype!r} is not one of {PARAM_DTYPES}")
    out = {}
    for k, v in flatten(params).items():
        v = np.asarray(v, np.float32)
        if param_dtype == "float16" and v.ndim >= 2:
            half = v.astype(np.float16)
            if not np.all(np.isfinite(half)):
                raise ValueError(f"parameter {k} does not fit float16 (max |x| "
                                 f"{float(np.max(np.abs(v))):.3g}); save it as float32")
            v = half
        out[k] = v
    return out


def _write_synced(file: Path, data: bytes) -> None:
    """Writes data and flushes it to the disk, so a later rename publishes complete bytes."""
    with open(file, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_error(path: AnyPath, error: OSError) -> WriteError:
    """One line naming path and the system's reason ("No space left on device")."""
    reason = error.strerror or str(error)
    err = WriteError(f"cannot write {path}: {reason} (nothing was written there)")
    err.errno = error.errno
    return err


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What config.json says besides the params.

    config: ViT fields as saved (load-time overrides not included); image_size: (H, W) the
    position embeddings fit; normalization: a `tome_jax.normalization` name; source: free text.
    """

    config: dict[str, Any]
    image_size: tuple[int, int]
    normalization: str
    source: str


def _image_hw(image_size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        return image_size, image_size
    h, w = image_size
    return int(h), int(w)


def save_model(dst: str | os.PathLike, params: Mapping[str, Any], config: dict[str, Any], *,
               image_size: int | tuple[int, int], normalization: str,
               source: str = "", param_dtype: str = "float32") -> AnyPath:
    """Writes DST/{params.msgpack, config.json} atomically: DST appears only when complete.

    params: a nested tree or a flat {"a/b/c": array} dict (saved as float32). param_dtype
    "float16" stores tensors of two or more dimensions (kernels, embeddings: nearly all the
    bytes) as float16 and keeps vectors (biases, norms, LayerScale, whose small values float16
    would flush) float32; ValueError if a matrix overflows float16. config.json
    records the sha256 of params.msgpack and of `config` (see the module doc). Raises
    DestinationExistsError (a CheckpointError and a FileExistsError) if DST exists, and
    WriteError (a CheckpointError and an OSError) naming DST when the disk is full or not
    writable; either way nothing is left behind.
    """
    from flax import serialization

    norm.check(normalization)
    image_hw = _image_hw(image_size)
    dst = as_path(dst)
    if dst.exists() or (not is_remote(dst) and dst.is_symlink()):
        raise DestinationExistsError(f"{dst} exists; refusing to overwrite")
    tree = unflatten(stored_params(params, param_dtype))
    data = serialization.msgpack_serialize(tree)
    meta = {"model": config, "image_size": list(image_hw), "normalization": normalization,
            "source": source, "format": FORMAT, CHECKSUMS: checksums(data, config)}
    if is_remote(dst):
        _save_remote(dst, data, json.dumps(meta, indent=2).encode())
        return dst
    tmp = None
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it 0700; the result should look like mkdir's
        _write_synced(tmp / PARAMS_FILE, data)
        _write_synced(tmp / CONFIG_FILE, json.dumps(meta, indent=2).encode())
        os.replace(tmp, dst)  # atomic on one filesystem
    except BaseException as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and not isinstance(e, CheckpointError):
            if dst.exists() or dst.is_symlink():  # another writer won the race for the name
                raise DestinationExistsError(f"{dst} exists; refusing to overwrite") from e
            raise write_error(dst, e) from e
        raise
    return dst


def _save_remote(dst: AnyPath, params_data: bytes, config_data: bytes) -> None:
    """save_model on an object store, which has no atomic rename of a folder: each object
    appears whole when written, and config.json, written last, marks DST complete (load_model
    and is_model_dir want both files). On failure the objects written are removed."""
    written = []
    try:
        for name, content in ((PARAMS_FILE, params_data), (CONFIG_FILE, config_data)):
            written.append(dst / name)
            written[-1].write_bytes(content)
    except OSError as e:
        for obj in written:
            try:
                obj.unlink(missing_ok=True)
            except OSError:
                pass
        raise write_error(dst, e) from e


def is_model_dir(path: str | os.PathLike) -> bool:
    """True when path holds both config.json and params.msgpack (contents not checked)."""
    path = as_path(path)
    return (path / CONFIG_FILE).is_file() and (path / PARAMS_FILE).is_file()


def _require_files(path: AnyPath, names: tuple[str, ...]) -> None:
    for name in names:
        if not (path / name).is_file():
            raise CheckpointError(f"{path} is not a converted checkpoint: {path / name} is "
                                  "missing (make one with `python -m tome_jax.convert SRC DIR`"
                                  " or `python -m train.ship`)")


def _parse_info(path: AnyPath, meta: Any) -> ModelInfo:
    """config.json's parsed JSON -> ModelInfo; CheckpointError naming the file if malformed."""
    file = path / CONFIG_FILE
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict):
        raise CheckpointError(f"{file} does not describe a tome_jax ViT: no \"model\" object")
    size = meta.get("image_size") or DEFAULT_IMAGE_SIZE
    try:
        image_hw = _image_hw(size)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{file}: image_size {size!r} is not [H, W] ({e})") from None
    name = meta.get("normalization", LEGACY_NORMALIZATION)
    try:
        norm.check(name)
    except ValueError as e:
        raise CheckpointError(f"{file}: {e}") from None
    expected = _recorded(file, meta).get("model")
    if expected is not None and model_digest(meta["model"]) != expected:
        raise CheckpointError(f"{file}: checksum mismatch of its \"model\" object (expected "
                              f"{expected}, got {model_digest(meta['model'])}); the file is "
                              "corrupt or was edited")
    return ModelInfo(config=dict(meta["model"]), image_size=image_hw, normalization=name,
                     source=str(meta.get("source", "")))


def _recorded(file: AnyPath, meta: dict[str, Any]) -> dict[str, str]:
    """config.json's digests ({} for a directory written before they existed)."""
    sums = meta.get(CHECKSUMS, {})
    if not isinstance(sums, dict) or not all(isinstance(v, str) for v in sums.values()):
        raise CheckpointError(f"{file}: \"{CHECKSUMS}\" is not an object of hex digests")
    return sums


def _read_meta(path: AnyPath) -> dict[str, Any]:
    """config.json parsed; CheckpointError naming it when unreadable."""
    try:
        return json.loads((path / CONFIG_FILE).read_text())
    except (ValueError, OSError) as e:  # UnicodeDecodeError is a ValueError
        raise CheckpointError(f"{path / CONFIG_FILE} does not describe a tome_jax ViT: "
                              f"{type(e).__name__}: {e}") from None


def read_info(path: str | os.PathLike) -> ModelInfo:
    """DIR/config.json -> ModelInfo, without reading the params (the "model" digest is checked)."""
    path = as_path(path)
    _require_files(path, (CONFIG_FILE,))
    return _parse_info(path, _read_meta(path))


def _read_params(file: AnyPath, expected: str | None) -> dict[str, np.ndarray]:
    """params.msgpack -> flat arrays; CheckpointError naming the file when its sha256 is not
    `expected` (None: nothing recorded to check) or its bytes do not parse."""
    from flax import serialization

    try:
        data = file.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{file}: cannot read it ({e.strerror or e})") from None
    if expected is not None and sha256_hex(data) != expected:
        raise CheckpointError(f"{file}: checksum mismatch (expected {expected}, got "
                              f"{sha256_hex(data)}); the file is corrupt")
    try:
        params = serialization.msgpack_restore(data)
        # float16 matrices (save_model(param_dtype="float16")) compute as float32.
        return {k: np.asarray(v, np.float32) if np.asarray(v).dtype == np.float16
                else np.asarray(v) for k, v in flatten(params).items()}
    except Exception as e:  # noqa: BLE001 - msgpack raises several types on bad bytes
        raise CheckpointError(f"{file} is corrupt or not a params file "
                              f"({type(e).__name__}: {e})") from None


def _check_fit(path: AnyPath, flat: dict[str, np.ndarray], model: ViT,
               image_hw: tuple[int, int]) -> None:
    """CheckpointError listing missing, unexpected and mis-shaped tensors, if any."""
    try:
        shapes = abstract_params(model, image_hw)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path / CONFIG_FILE} does not describe a tome_jax ViT at "
                              f"{image_hw} px: {type(e).__name__}: {e}") from None
    expected = {k: tuple(v.shape) for k, v in flatten(shapes).items()}
    got = {k: tuple(v.shape) for k, v in flat.items()}
    if got != expected:
        missing, extra = sorted(expected.keys() - got), sorted(got.keys() - expected)
        other = [f"{k} {got[k]} vs {expected[k]}" for k in sorted(expected.keys() & got)
                 if got[k] != expected[k]]
        raise CheckpointError(f"{path} does not fit its config's model: missing {missing[:3]}, "
                              f"unexpected {extra[:3]}, other shapes {other[:3]}")


def load_model(path: str | os.PathLike, **overrides: Any) -> tuple[ViT, Any, ModelInfo]:
    """A model directory -> (ViT, params as jax arrays, ModelInfo).

    overrides: ViT fields to change at load time (e.g. r=8, strategy="prune").
    Raises CheckpointError naming the problem: a missing file, a config that does not describe
    a tome_jax ViT, a file whose sha256 differs from the one recorded in config.json, an
    unreadable params file, or parameters that do not fit the model (a tensor missing, extra
    or of another shape, e.g. DTEM embeddings the config does not know).
    """
    import jax.numpy as jnp

    from tome_jax.vit import ViT

    path = as_path(path)
    _require_files(path, (CONFIG_FILE, PARAMS_FILE))
    meta = _read_meta(path)
    info = _parse_info(path, meta)
    try:
        model = ViT(**{**info.config, **overrides})
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path / CONFIG_FILE} does not describe a tome_jax ViT: "
                              f"{type(e).__name__}: {e}") from None
    recorded = _recorded(path / CONFIG_FILE, meta).get(PARAMS_FILE)
    flat = _read_params(path / PARAMS_FILE, recorded)
    _check_fit(path, flat, model, info.image_size)
    return model, unflatten({k: jnp.asarray(v) for k, v in flat.items()}), info
