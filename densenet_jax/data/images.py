"""Reading one image file: the one place that decides whether an image is unreadable, and the one
rule that turns every Pillow mode into the 8-bit RGB (or L) that the models take.

8-bit modes convert exactly as torchvision's loader converts them (``Image.convert``; alpha is
dropped, so a transparent pixel shows the colour stored under it). Wider modes are scaled, never
clipped to 8 bits as ``Image.convert`` does:

- ``I;16`` (and its byte orders ``I;16B``, ``I;16L``, ``I;16N``): 0..65535 -> ``round(x / 257)``,
  so 65535 -> 255 and 1000 -> 4;
- ``I`` (32-bit integers): read as 16-bit data, since that is what Pillow stores there (16-bit PNG
  and TIFF pixels after any operation): clipped to 0..65535, then as ``I;16``;
- ``F`` (32-bit floats): read as 0.0..1.0, the usual range of floating-point images: clipped to it
  (NaN -> 0), then ``round(x * 255)``.
"""

from __future__ import annotations

import io
import logging
import os
import stat
import struct

import numpy as np
from PIL import Image

from densenet_jax.errors import DataError

log = logging.getLogger("densenet_jax")

# torchvision.datasets.folder.IMG_EXTENSIONS, compared case-insensitively as torchvision does.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# What Pillow raises for a file it cannot decode: not an image or truncated (OSError, including
# UnidentifiedImageError and FileNotFoundError), malformed headers (SyntaxError, ValueError,
# struct.error, EOFError, IndexError, TypeError, as its plugins raise them), and headers declaring
# more than twice Image.MAX_IMAGE_PIXELS pixels (DecompressionBombError, not an OSError).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, struct.error, EOFError, IndexError, TypeError,
                  Image.DecompressionBombError)


class UnreadableImage(DataError):
    """An image file that cannot be opened or decoded; the message names the file and the reason."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path, self.reason = os.fspath(path), reason
        super().__init__(f"{self.path}: unreadable image ({reason})")

    def __reduce__(self):  # rebuilt from its fields when it crosses from a worker process
        return type(self), (self.path, self.reason)


def read_image(path: str | os.PathLike, mode: str = "RGB") -> Image.Image:
    """The image at ``path``, decoded now (the file closed) and converted to ``mode``: ``"RGB"``,
    or ``"L"`` for a one-channel model, by the module's rules for each Pillow mode.

    Raises UnreadableImage (a DataError) naming the file for every way a file can fail to decode,
    a broken link (naming its target) and a path that is no regular file (a FIFO or a device,
    whose reading would wait for a writer or never end)."""
    if mode not in ("RGB", "L"):
        raise ValueError(f"image mode {mode!r}: RGB or L")
    _check_regular(path)
    try:
        with Image.open(path) as im:
            im.load()
            return to_8bit(im, mode)
    except _DECODE_ERRORS as e:
        raise UnreadableImage(path, f"{type(e).__name__}: {e}") from None


def decode_image(data: bytes, name: str, mode: str = "RGB") -> Image.Image:
    """The image encoded in ``data`` (a Parquet row's or a tar member's bytes), decoded and
    converted to ``mode`` as :func:`read_image` converts a file's. Raises UnreadableImage naming
    ``name`` (where the bytes came from) for every way the bytes can fail to decode."""
    if mode not in ("RGB", "L"):
        raise ValueError(f"image mode {mode!r}: RGB or L")
    buffer = io.BytesIO(data)
    try:
        with Image.open(buffer) as im:
            im.load()
            return to_8bit(im, mode)
    except _DECODE_ERRORS as e:  # Pillow names the buffer's address: the message names ``name``
        raise UnreadableImage(name, f"{type(e).__name__}: {str(e).replace(f' {buffer!r}', '')}") from None


_NOT_REGULAR = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder"))


def _check_regular(path: str | os.PathLike) -> None:
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        if os.path.islink(path):
            raise UnreadableImage(path, f"broken link to {os.readlink(path)}: {e.strerror}") from None
        raise UnreadableImage(path, f"{type(e).__name__}: {e.strerror}") from None
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _NOT_REGULAR if test(mode)), stat.filemode(mode))
        raise UnreadableImage(path, f"not a regular file: {kind}")


def to_8bit(im: Image.Image, mode: str = "RGB") -> Image.Image:
    """``im`` (any Pillow mode) as an 8-bit ``mode`` image (``"RGB"`` or ``"L"``), scaling 16-bit,
    32-bit integer and float pixels into 0..255 by the module's rules rather than clipping them."""
    if im.mode.startswith("I;16") or im.mode == "I":
        wide = np.clip(np.asarray(im, np.int64), 0, 65535)
        # round(x / 257) in integers: (x + 128) // 257 never ties, as 257 is odd.
        return Image.fromarray(((wide + 128) // 257).astype(np.uint8), "L").convert(mode)
    if im.mode == "F":
        x = np.nan_to_num(np.asarray(im, np.float64), nan=0.0)
        return Image.fromarray(np.round(np.clip(x, 0.0, 1.0) * 255).astype(np.uint8), "L").convert(mode)
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")  # the palette's colours; Pillow warns when converting P with it directly
    return im if im.mode == mode else im.convert(mode)


_warned: set[str] = set()


def warn_skipped(error: UnreadableImage, instead: str = "") -> None:
    """The one warning every reader gives for an unreadable image, once per file in a process:
    the file, why, and what is used in its place (``instead``, if anything)."""
    if error.path in _warned:
        return
    _warned.add(error.path)
    log.warning("warning: %s: unreadable image, skipped (%s)%s", error.path, error.reason,
                f"; {instead} in its place" if instead else "")


UNREADABLE_SEPARATOR = "\0"  # no path holds it
STAND_IN = "the next readable image"  # what a folder's examples put in an unreadable one's place


def warn_unreadable(notes: np.ndarray) -> None:
    """The warnings for the files that a batch's ``unreadable`` field names (see
    ``folder.FileSource``), once per file in this process."""
    for note in np.ravel(notes):
        fields = str(note).split(UNREADABLE_SEPARATOR) if note else []
        for path, reason in zip(fields[::2], fields[1::2]):
            warn_skipped(UnreadableImage(path, reason), STAND_IN)
