"""Export a merged ViT as a serialized StableHLO artefact (`jax.export`).

The artefact holds the whole forward at a fixed r schedule with the parameters baked in as
constants, so serving needs only JAX (no tome_jax, no flax):

    python -m tome_jax.export --checkpoint DIR --r 16 --out model.jaxexport [--batch-size 8]

    exported = load_exported("model.jaxexport")   # checks the bytes against the sidecar
    logits = exported.call(images)      # images [b, H, W, 3] float32, normalised

Beside it, `model.jaxexport.json` records the input shape ("b" for a symbolic batch) and dtype,
the r schedule (requested and per block), the model config, the byte count and sha256 of the
artefact and the JAX version that wrote it. Serving without tome_jax: docs/export.md shows the
same check in a few lines of hashlib. Either path may be an object-store URL (gs://...).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from tome_jax.storage import AnyPath, as_path, is_remote

FORMAT = "tome_jax.export/1"
SIDECAR_SUFFIX = ".json"


class ExportError(ValueError):
    """An artefact that cannot be read back (missing, truncated, corrupt, mismatched)."""


def export_model(model: Any, params: Any, image_shape: tuple[int | None, int, int, int],
                 platforms: Sequence[str] | None = None) -> jax.export.Exported:
    """jax.export of `images -> logits` with params closed over (baked in as constants).

    image_shape: (batch, H, W, C); batch None exports a symbolic batch dimension "b", an int
    a fixed batch. platforms: lowering targets (e.g. ["cpu", "cuda"]); None: the default
    backend's platform. The logits are float32 [batch, num_classes] (the pooled features when
    the model has no head).
    """
    batch, h, w, c = image_shape
    model.check((1, h, w, c))  # clear errors for bad sizes before tracing
    patch = model.dims.patch_size
    pos = params.get("pos_embedding") if hasattr(params, "get") else None
    if pos is not None and pos.shape[1] != (h // patch) * (w // patch):
        raise ExportError(f"the parameters' position embeddings cover {pos.shape[1]} patches, "
                          f"a {h}x{w} image has {(h // patch) * (w // patch)}: export at the "
                          "checkpoint's image size or reconvert it with --image-size")
    params = jax.tree_util.tree_map(jnp.asarray, params)

    def forward(images: jax.Array) -> jax.Array:
        logits, _ = model.apply({"params": params}, images)
        return logits

    if batch is None:
        (b,) = jax.export.symbolic_shape("b")
        spec = jax.ShapeDtypeStruct((b, h, w, c), jnp.float32)
    else:
        spec = jax.ShapeDtypeStruct((int(batch), h, w, c), jnp.float32)
    kwargs = {} if platforms is None else {"platforms": tuple(platforms)}
    return jax.export.export(jax.jit(forward), **kwargs)(spec)


def describe(exported: jax.export.Exported, model: Any, image_size: tuple[int, int],
             data: bytes) -> dict[str, Any]:
    """The JSON sidecar for an exported model and its serialized bytes."""
    (aval,) = exported.in_avals
    rs, tokens = model.token_schedule(image_size)
    fields = getattr(model, "__dataclass_fields__", {})
    config = {k: getattr(model, k) for k in fields if k not in ("parent", "name")}
    if "dtype" in config:
        config["dtype"] = jnp.dtype(config["dtype"]).name
    config = json.loads(json.dumps(config, default=str))  # dtypes and tuples as JSON
    return {
        "format": FORMAT,
        "input": {"shape": [d if isinstance(d, int) else str(d) for d in aval.shape],
                  "dtype": str(aval.dtype), "layout": "NHWC, normalised"},
        "output": {"shape": [d if isinstance(d, int) else str(d)
                             for d in exported.out_avals[0].shape],
                   "dtype": str(exported.out_avals[0].dtype)},
        "variant": model.variant,
        "r": json.loads(json.dumps(model.r, default=str)),
        "r_per_block": list(rs),
        "tokens_per_block": list(tokens),
        "model": config,
        "platforms": list(exported.platforms),
        "jax_version": jax.__version__,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }


def sidecar_path(path: str | os.PathLike) -> AnyPath:
    """model.jaxexport -> model.jaxexport.json"""
    path = as_path(path)
    return path.with_name(path.name + SIDECAR_SUFFIX)


def save_exported(path: str | os.PathLike, exported: jax.export.Exported,
                  meta_fn: Any = None, *, overwrite: bool = False) -> dict[str, Any]:
    """Writes the serialized artefact and its sidecar; returns the sidecar.

    meta_fn(bytes) -> sidecar dict; None writes the bytes' size and hash only (the sha256 is
    what `load_exported` checks). Both files are written to temporary names first and renamed
    when complete, so a crash or a full disk never leaves a half-written file under the final
    names. Raises ExportError when path exists and not `overwrite`, and ExportError naming path
    and the reason ("No space left on device") when it cannot be written.
    """
    path = as_path(path)
    if path.exists() and not overwrite:
        raise ExportError(f"{path} exists; refusing to overwrite it (overwrite=True, or "
                          "--overwrite on the command line, replaces it)")
    data = bytes(exported.serialize())
    meta = meta_fn(data) if meta_fn else {"format": FORMAT, "bytes": len(data),
                                          "sha256": hashlib.sha256(data).hexdigest(),
                                          "jax_version": jax.__version__}
    side = sidecar_path(path)
    if is_remote(path):
        _save_remote(path, side, data, json.dumps(meta, indent=2).encode())
        return meta
    temps: list[Path] = []
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for target, content in ((path, data), (side, json.dumps(meta, indent=2).encode())):
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
            temps.append(Path(tmp))
            with os.fdopen(fd, "wb") as f:
                f.write(content)
                f.flush()
                os.fsync(f.fileno())
        # The artefact first: between the two renames an old sidecar no longer matches it, so
        # load_exported refuses the pair instead of trusting it.
        for tmp, target in zip(temps, (path, side), strict=True):
            os.replace(tmp, target)
    except OSError as e:
        for tmp in temps:
            with contextlib.suppress(OSError):
                tmp.unlink()
        raise ExportError(f"cannot write {path}: {e.strerror or e} (nothing was written "
                          "there)") from e
    return meta


def _save_remote(path: AnyPath, side: AnyPath, data: bytes, side_data: bytes) -> None:
    """save_exported on an object store: each object appears whole once written; the artefact
    first, so a failure in between leaves an old sidecar that no longer matches it."""
    try:
        path.write_bytes(data)
        side.write_bytes(side_data)
    except OSError as e:
        raise ExportError(f"cannot write {path}: {e.strerror or e}") from e


def load_exported(path: str | os.PathLike, *, verify: bool = True) -> jax.export.Exported:
    """Reads an artefact back after checking its bytes against the sidecar's size and sha256.

    Raises ExportError naming the file when it is missing, truncated, corrupt (a checksum
    mismatch) or not deserializable, and when `verify` and there is no sidecar with a sha256
    to check against (verify=False loads such a file unchecked).
    """
    path = as_path(path)
    if not path.is_file():
        raise ExportError(f"no exported model at {path}")
    data = path.read_bytes()
    side = sidecar_path(path)
    meta: dict[str, Any] = {}
    if side.is_file():
        try:
            meta = json.loads(side.read_text())
        except (ValueError, OSError) as e:
            raise ExportError(f"sidecar {side} is not valid JSON: {e}") from None
    if verify and not isinstance(meta.get("sha256"), str):
        raise ExportError(f"{path}: no sidecar {side.name} with its sha256 beside it, so it "
                          "cannot be verified (keep the two files together, or load it "
                          "unverified with verify=False)")
    if "bytes" in meta and len(data) != meta["bytes"]:
        raise ExportError(f"{path} has {len(data)} bytes but {side.name} records "
                          f"{meta['bytes']}: the file is truncated or was replaced")
    got = hashlib.sha256(data).hexdigest()
    if "sha256" in meta and got != meta["sha256"]:
        raise ExportError(f"{path}: checksum mismatch (expected {meta['sha256']}, got {got}); "
                          "the file is corrupt")
    try:
        return jax.export.deserialize(bytearray(data))
    except Exception as e:  # flatbuffers / MLIR raise assorted types on garbage
        raise ExportError(f"{path} is not a readable jax.export artefact (truncated, corrupt, "
                          f"or written by an incompatible JAX): {type(e).__name__}: "
                          f"{(str(e).strip().splitlines() or [''])[0]}") from None


if __name__ == "__main__":
    from tome_jax.cli.export import main

    raise SystemExit(main())
