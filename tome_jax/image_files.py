"""Image files that cannot be used: named, in one line, or left out and listed.

A folder of images (`<split>/<class>/<image>`) may hold files that do not decode (truncated,
empty, text named .jpg) or that decode to the wrong picture (bytes overwritten). Decoding
catches the first kind; the second often decodes without complaint (JPEG has no checksum: in
a CIFAR-sized JPEG most overwritten byte runs still decode, to a changed image or the same
one), so only a record of the files' digests catches it. A folder may carry one:

    DIR/SHA256SUMS      one "<sha256 hex>  <split>/<class>/<file>" line per image, as
                        `cd DIR && sha256sum */*/* > SHA256SUMS` writes it

When it is there, every image read is checked against it; files it does not list are not
checked. `write_manifest(DIR)` writes one.

    bad = [BadImage(path, reason), ...]
    raise bad_images_error(bad, "image_folder 'test'")   # names the first, counts the rest
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

MANIFEST = "SHA256SUMS"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
SKIP_HINT = "--skip-bad-images (skip_bad_images=True) leaves them out and lists them"


class BadImageError(ValueError):
    """An image that cannot be used; the message names the file in one line."""


@dataclasses.dataclass(frozen=True)
class BadImage:
    """A file left out (or refused): its path and why."""

    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def read_manifest(root: str | os.PathLike) -> dict[str, str] | None:
    """ROOT/SHA256SUMS as {"split/class/file": hex digest}; None when there is none.

    Accepts what `sha256sum` writes: "<hex>  <path>" or "<hex> *<path>", paths maybe "./"-led.
    """
    file = Path(root) / MANIFEST
    if not file.is_file():
        return None
    sums = {}
    for number, line in enumerate(file.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        digest, _, name = line.partition(" ")
        name = name.lstrip(" *").removeprefix("./")
        if len(digest) != 64 or not name:
            raise ValueError(f"{file}:{number} is not a '<sha256>  <path>' line: {line[:80]!r}")
        sums[name] = digest.lower()
    return sums


def write_manifest(root: str | os.PathLike) -> Path:
    """Writes ROOT/SHA256SUMS for every image under ROOT/<split>/<class>/; returns its path."""
    root = Path(root)
    names = sorted(p.relative_to(root).as_posix() for p in root.glob("*/*/*")
                   if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    lines = [f"{hashlib.sha256((root / n).read_bytes()).hexdigest()}  {n}\n" for n in names]
    out = root / MANIFEST
    out.write_text("".join(lines))
    return out


def checksum_problem(data: bytes, expected: str | None) -> str | None:
    """Why data is not what the manifest recorded (None: it is, or nothing was recorded)."""
    if expected is None:
        return None
    got = hashlib.sha256(data).hexdigest()
    if got == expected:
        return None
    return (f"checksum mismatch with {MANIFEST} (expected {expected}, got {got}); the file is "
            "corrupt")


def manifest_problems(root: str | os.PathLike, names: Iterable[str],
                      manifest: Mapping[str, str]) -> list[BadImage]:
    """Files among ROOT/<name> whose bytes differ from the manifest (unlisted ones pass)."""
    root = Path(root)
    bad = []
    for name in names:
        if name in manifest:
            problem = checksum_problem(read_bytes(root / name), manifest[name])
            if problem:
                bad.append(BadImage(str(root / name), problem))
    return bad


def decode_rgb(encoded: bytes) -> tuple[Any, str | None]:
    """(the decoded RGB PIL image, None), or (None, why PIL cannot decode these bytes)."""
    from PIL import Image, UnidentifiedImageError

    if not encoded:
        return None, "empty file (0 bytes)"
    try:
        with Image.open(io.BytesIO(encoded)) as image:
            return image.convert("RGB"), None
    except UnidentifiedImageError:
        return None, "not an image (no known image format)"
    except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError ...
        return None, f"not a decodable image ({first_line(e) or type(e).__name__})"


def decode_problem(encoded: bytes) -> str | None:
    """Why PIL cannot decode these bytes to an RGB image (None: it can)."""
    return decode_rgb(encoded)[1]


def first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0]


def read_bytes(path: str | os.PathLike) -> bytes:
    """The file's bytes; BadImageError naming it when it cannot be read."""
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise BadImageError(f"{path}: cannot read it ({e.strerror or e})") from None


def bad_images_error(bad: list[BadImage], where: str) -> BadImageError:
    """One line: the first bad file and its reason, how many others, how to skip them."""
    more = f"; {len(bad) - 1} more bad image(s) in {where}" if len(bad) > 1 else ""
    return BadImageError(f"{bad[0]}{more}; {SKIP_HINT}")


def skipped_line(skipped: list[BadImage] | tuple[BadImage, ...], show: int = 5) -> str:
    """"skipped 2 bad image(s): PATH: REASON; PATH: REASON", the first `show` of them."""
    listed = "; ".join(str(b) for b in skipped[:show])
    more = f"; and {len(skipped) - show} more" if len(skipped) > show else ""
    return f"skipped {len(skipped)} bad image(s): {listed}{more}"
