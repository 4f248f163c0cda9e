"""Compressed corpus files: whether a file's first bytes agree with its compression suffix, and
its decompressed bytes.

The data tools read ``.gz`` (gzip), ``.xz`` (lzma) and ``.zst`` (zstandard; needs the
``zstandard`` module). A file's first bytes must agree with its name: a gzip file named ``.jsonl``,
or a plain one named ``.jsonl.gz``, is refused with the name to give it; bzip2 and zip are refused
with how to unpack them. A file that ends inside a compressed stream is an error, for all three.
"""

from __future__ import annotations

import codecs
import gzip
import io
import lzma
import os
import re
from typing import BinaryIO

from megatron_patch.errors import DataError

COMPRESSIONS = (".gz", ".xz", ".zst")
_MAGIC = {  # the first bytes of a compressed file, by compression
    ".gz": ("gzip", (b"\x1f\x8b",)),
    ".xz": ("xz", (b"\xfd7zXZ\x00", b"\x5d\x00\x00")),  # and legacy .lzma, which lzma reads too
    ".zst": ("zstd", (b"\x28\xb5\x2f\xfd",) + tuple(bytes([n, 0x2A, 0x4D, 0x18]) for n in range(0x50, 0x60))),
}  # zstd: a frame, or a skippable frame first (pzstd writes one)
_UNREADABLE = {  # compressions the tools do not read: pattern of the first bytes -> what to tell
    rb"BZh[1-9](1AY&SY|\x17rE8P\x90)": "bzip2-compressed, which the data tools do not read; decompress it "
    "(bunzip2 -k FILE)",
    rb"PK\x03\x04": "a zip archive, which the data tools do not read; unzip it and pass its files",
}


def check_compression(path: str, compression: str | None) -> None:
    """DataError when the first bytes of ``path`` contradict its compression suffix ``compression``
    (``.gz``, ``.xz``, ``.zst`` or None); the message names the compression found and the name to
    give the file. Reads at most 10 bytes."""
    try:
        with open(path, "rb") as stream:
            head = stream.read(10)
    except OSError as err:
        raise DataError(f"cannot open input '{path}': {err.strerror}; check the permissions") from None
    unreadable = next((what for pattern, what in _UNREADABLE.items() if re.match(pattern, head)), None)
    if unreadable:
        what = unreadable.replace("FILE", f"'{path}'")
        raise DataError(f"input '{path}' is {what}, or recompress it as .gz, .xz or .zst")
    found = next((c for c, (_, magics) in _MAGIC.items() if head.startswith(magics)), None)
    if found == compression:
        return
    stem = path[: -len(compression)] if compression else path
    if found is not None:
        raise DataError(
            f"input '{path}' is {_MAGIC[found][0]}-compressed but named {compression or os.path.splitext(path)[1]}; "
            f"rename it '{stem}{found}'"
        )
    name, magics = _MAGIC[compression]
    if len(head) < len(magics[0]) and magics[0].startswith(head):
        return  # empty, or cut off within the magic bytes: reading says it is truncated
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        raise DataError(
            f"input '{path}' does not start like a {name} file (its first bytes are {head[:6].hex(' ')}); "
            f"the file is damaged, re-create or re-download it"
        ) from None
    raise DataError(f"input '{path}' is plain text, not {name}-compressed, but named {compression}; rename it '{stem}'")


def open_decompressed(path: str, compression: str | None) -> tuple[BinaryIO, BinaryIO]:
    """Open ``path`` for reading decompressed bytes (``compression``: one of COMPRESSIONS or None).

    Returns ``(stream, raw)``: ``stream`` yields the decompressed bytes line by line, ``raw`` is
    the file on disk, whose ``tell()`` (in bytes of the file's size on disk) measures progress.
    """
    try:
        raw = open(path, "rb")
    except OSError as err:
        raise DataError(f"cannot open input '{path}': {err.strerror}; check the permissions")
    if compression is None:
        return raw, raw
    if compression == ".gz":
        return gzip.GzipFile(fileobj=raw, mode="rb"), raw
    if compression == ".xz":
        return lzma.LZMAFile(raw, mode="rb"), raw
    try:
        import zstandard
    except ImportError:
        raw.close()
        raise DataError(
            f"input '{path}' is zstd-compressed but the 'zstandard' module is not installed; "
            f"run 'pip install zstandard' or decompress it first (zstd -d '{path}')"
        ) from None
    return io.BufferedReader(_ZstdFrames(raw, zstandard.ZstdDecompressor()), 1 << 20), raw


class _ZstdFrames(io.RawIOBase):
    """Decompressed bytes of the zstd frames of ``raw``, one after the other.

    ``zstandard``'s ``stream_reader`` ends quietly where a truncated file ends; here a frame cut
    off by the end of the file raises ``EOFError``, as ``gzip`` and ``lzma`` do.
    """

    def __init__(self, raw: BinaryIO, decompressor) -> None:
        super().__init__()
        self._raw = raw
        self._decompressor = decompressor
        self._frame = None  # the decompressobj of the frame being read; None between frames
        self._input = b""  # compressed bytes read from raw, not yet given to a frame
        self._output = memoryview(b"")  # decompressed bytes not yet returned

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._output:
            if self._frame is not None and self._frame.eof:
                self._input, self._frame = self._frame.unused_data, None
            if not self._input:
                self._input = self._raw.read(1 << 16)
                if not self._input:
                    if self._frame is not None:
                        raise EOFError("compressed file ended before the end-of-stream marker was reached")
                    return 0
            if self._frame is None:
                self._frame = self._decompressor.decompressobj()
            data, self._input = self._input, b""
            self._output = memoryview(self._frame.decompress(data))
        count = min(len(buffer), len(self._output))
        buffer[:count] = self._output[:count]
        self._output = self._output[count:]
        return count


def raise_if_read_error(path: str, where: str, err: Exception) -> None:
    """Turn a decompression or I/O error while reading ``path`` (``where``: after which line, or
    empty) into a DataError; any other error is left to the caller."""
    # zstandard.ZstdError is not an OSError, so it is recognised by its module
    if isinstance(err, (OSError, EOFError, lzma.LZMAError)) or type(err).__module__.startswith("zstandard"):
        raise DataError(
            f"cannot read '{path}'{where}: {err}; the file looks truncated or corrupt, re-create or re-download it"
        ) from None
