"""Reading corpus files for the data tools: globs, JSON Lines or plain text, optional compression.

Unit: **one line of an input file is one document**.

* ``.jsonl`` and ``.json`` are JSON Lines (as in Megatron's ``preprocess_data.py``): each line is a
  JSON object, and the text of a document is the string under a key such as ``text``. A blank
  line is an empty document.
* ``.txt`` is plain text: each line (without its line break) is one document, stored under the
  first ``--json-keys`` key.
* Any of these may be compressed: ``.gz``, ``.xz`` or ``.zst``, with first bytes that agree with
  the name (:mod:`~megatron_patch.data.compression`).

Inputs are regular files (a pipe cannot be measured nor read twice) and JSON Lines, never one
pretty-printed JSON document (a first line that is a lone ``[`` or ``{`` is refused).

Files are read as bytes and decoded per line (strict UTF-8), so an invalid byte is reported with
its file and line number. A UTF-8 byte-order mark (``EF BB BF``, as some Windows editors write)
at the start of a file is dropped, as Python's ``utf-8-sig`` codec drops it: it marks the
encoding and is no text, so it neither breaks line 1 of a JSON Lines file nor joins the first
document of a text file. Anywhere else U+FEFF is a character like any other.
:func:`parse_line` runs in the worker processes of the preprocessing tool; everything else runs
in the main process.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import stat
import sys
from dataclasses import dataclass
from typing import Iterator, Sequence

from megatron_patch.data.compression import COMPRESSIONS, check_compression, open_decompressed, raise_if_read_error
from megatron_patch.errors import DataError

FORMATS = {".jsonl": "json", ".json": "json", ".txt": "text"}
_GLOB_CHARS = set("*?[")
_SURROGATE = re.compile("[\ud800-\udfff]")
BYTE_ORDER_MARK = b"\xef\xbb\xbf"
"""U+FEFF in UTF-8: a byte-order mark when it opens a file (dropped there, see the module doc)."""

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class InputFile:
    """One input file: its path, format (``json`` or ``text``), compression and size in bytes."""

    path: str
    format: str
    compression: str | None
    size: int


class BadLineError(Exception):
    """A line that cannot be used: ``reason`` says what is wrong, ``fix`` how to repair the file."""

    def __init__(self, reason: str, fix: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.fix = fix


def describe_file(path: str) -> InputFile:
    """Classify ``path`` by its suffixes (``name.jsonl.xz`` -> json, xz); DataError if unknown."""
    name = os.path.basename(path).lower()
    compression = next((c for c in COMPRESSIONS if name.endswith(c)), None)
    stem = name[: -len(compression)] if compression else name
    fmt = next((f for suffix, f in FORMATS.items() if stem.endswith(suffix)), None)
    if fmt is None:
        raise DataError(
            f"input '{path}' has an unknown format; name it *.jsonl, *.json or *.txt, optionally "
            f"followed by .gz, .xz or .zst"
        )
    info = os.stat(path)
    if not stat.S_ISREG(info.st_mode):  # checked before opening: opening a FIFO waits for a writer
        raise DataError(
            f"input '{path}' is not a regular file (a pipe, socket or device); inputs must be regular files: "
            f"write the stream to a file first (e.g. command > corpus.jsonl)"
        )
    check_compression(path, compression)
    return InputFile(path, fmt, compression, info.st_size)


def expand_inputs(patterns: Sequence[str]) -> list[InputFile]:
    """Expand files and globs (``data/*.jsonl.xz``, ``**`` allowed) in the order given.

    Each glob's matches are sorted by name. An existing path is a plain path even when it holds
    glob characters (``web[2024].jsonl``). A missing file, a directory, or a glob that matches no
    file is a :class:`DataError`.

    Every file is read once, at its first place in the list (files are compared by
    ``os.path.realpath``, so ``./a.jsonl`` and a symlink to it are the same file). A file that
    several patterns match (``g/*.jsonl`` and ``g/**/*.jsonl``, as ``**`` also matches no folder;
    or ``g/a.jsonl`` and ``g/*.jsonl``) is an overlap of patterns, the normal way to select files
    with globs, so it is de-duplicated with one info line. The same file named twice by plain
    paths, without a glob, cannot be an overlap: it is a typo or an attempt to weight that file
    twice, which these tools do not do (weights belong to the data blend), so it is a
    :class:`DataError`.
    """
    if not patterns:
        raise DataError("no input given; pass --input FILE [FILE ...] (files or quoted globs)")
    files: list[InputFile] = []
    named: dict[str, str] = {}  # realpath -> the plain path that named it
    seen: set[str] = set()
    overlaps: list[str] = []
    for pattern in patterns:
        if _GLOB_CHARS & set(pattern) and not os.path.exists(pattern):
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not matches:
                raise DataError(
                    f"--input glob '{pattern}' matches no file; check the folder and the pattern "
                    f"(quote it so that the shell does not expand it)"
                )
        elif os.path.isdir(pattern):
            raise DataError(
                f"--input '{pattern}' is a folder; pass its files or a glob such as "
                f"'{os.path.join(pattern, '*.jsonl')}'"
            )
        elif not os.path.exists(pattern):
            raise DataError(f"--input file '{pattern}' does not exist; fix the path")
        else:
            note_named_once(named, pattern, os.path.realpath(pattern), "file")
            matches = [pattern]
        for path in matches:
            real = os.path.realpath(path)
            if real in seen:
                overlaps.append(path)
                continue
            seen.add(real)
            files.append(describe_file(path))
    if overlaps:
        logger.info(
            "%d --input match(es) repeat a file already listed (patterns overlap); every file is read once, "
            "at its first place (e.g. '%s')",
            len(overlaps),
            overlaps[0],
        )
    return files


def note_named_once(named: dict[str, str], name: str, real: str, what: str) -> None:
    """Record in ``named`` (realpath -> the ``--input`` name that gave it) that ``name`` is the
    ``what`` (file, prefix) at ``real``; DataError if an earlier name was the same one."""
    if real in named:
        same = "" if named[real] == name else f" (as '{named[real]}' and '{name}')"
        raise DataError(
            f"--input {what} '{named[real]}' is given twice{same}; list each {what} once "
            f"(the tools read every {what} once; weight corpora in the training data blend)"
        )
    named[real] = name


def check_text_keys(files: Sequence[InputFile], keys: Sequence[str]) -> None:
    """DataError if a plain-text file is among ``files`` while several ``--json-keys`` are given:
    a line of text is one text, stored under the one key."""
    text = next((f for f in files if f.format == "text"), None)
    if text is not None and len(keys) > 1:
        raise DataError(
            f"input '{text.path}' is plain text, one text per line, but --json-keys gives {len(keys)} keys "
            f"({' '.join(keys)}); pass a single --json-keys key, or process the plain-text files on their own"
        )


def iter_lines(files: Sequence[InputFile]) -> Iterator[tuple[int, int, bytes, int]]:
    """Yield ``(file index, line number from 1, raw line bytes, bytes read from disk so far)``.

    The raw bytes of line 1 come without a leading byte-order mark (BYTE_ORDER_MARK). The last
    field sums the on-disk (compressed) bytes of the files before plus the read position in the
    current file, to compare with the sum of ``InputFile.size``.
    """
    done = 0
    for index, file in enumerate(files):
        stream, raw = open_decompressed(file.path, file.compression)
        line_number = 0
        try:
            for line_number, line in enumerate(stream, start=1):
                if line_number == 1:
                    if line.startswith(BYTE_ORDER_MARK):
                        line = line[len(BYTE_ORDER_MARK) :]
                    if file.format == "json":
                        check_json_lines(file, line)
                yield index, line_number, line, done + raw.tell()
        except Exception as err:
            raise_if_read_error(file.path, f" after line {line_number}", err)
            raise
        finally:
            stream.close()
            raw.close()
        done += file.size


def check_json_lines(file: InputFile, first_line: bytes) -> None:
    """DataError when ``first_line`` of a JSON file opens a pretty-printed JSON document (a lone
    ``[`` or ``{``, or an array over several lines) instead of JSON Lines."""
    first = first_line.strip()
    if not (first in (b"[", b"{") or (first.startswith(b"[") and not first.endswith(b"]"))):
        return
    query = "'.[]'" if first.startswith(b"[") else "."
    if file.compression is None:
        example = f"jq -c {query} '{file.path}' > '{os.path.splitext(file.path)[0]}.jsonl'"
    else:
        example = f"decompress it, then jq -c {query} FILE > FILE.jsonl"
    raise DataError(
        f"{file.path}:1: the file starts with '{first[:20].decode('utf-8', 'replace')}' like a pretty-printed JSON "
        f"document, but inputs must be JSON Lines (one JSON object per line); convert it, e.g. {example}"
    )


def count_lines_per_file(files: Sequence[InputFile]) -> list[int]:
    """Number of lines (= documents) in each of ``files``, read in 1 MiB blocks after decompression."""
    counts = []
    for file in files:
        stream, raw = open_decompressed(file.path, file.compression)
        lines = 0
        last = b"\n"
        try:
            while block := stream.read(1 << 20):
                lines += block.count(b"\n")
                last = block[-1:]
        except Exception as err:
            raise_if_read_error(file.path, "", err)
            raise
        finally:
            stream.close()
            raw.close()
        counts.append(lines + (last != b"\n"))  # a last line without a line break
    return counts


def parse_line(raw: bytes, fmt: str, keys: Sequence[str], key_flag: str = "--json-keys") -> dict[str, str]:
    """Decode one line into ``{key: text}``; :class:`BadLineError` if it cannot be used.

    ``fmt`` is ``json`` or ``text`` (then ``keys`` holds one key); ``key_flag`` is the flag that
    named the keys, for the fix of a missing key. Empty texts are returned as
    ``""``; deciding what to do with them is the caller's business. Every text returned is valid
    Unicode (encodes to UTF-8): invalid bytes and lone surrogate escapes are bad lines.
    """
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BadLineError(
            f"invalid UTF-8 (byte 0x{raw[err.start]:02x} at byte {err.start} of the line)",
            "re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)",
        ) from None
    if fmt == "text":
        return {keys[0]: line.rstrip("\r\n")}
    line = line.rstrip("\r\n")
    if not line.strip():
        return {key: "" for key in keys}
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise BadLineError(
            f"malformed JSON ({err.msg} at column {err.colno})",
            "fix or remove the line",
        ) from None
    except RecursionError:
        raise BadLineError("malformed JSON (nested too deeply to parse)", "fix or remove the line") from None
    except ValueError:  # not a JSONDecodeError: the one other failure is an integer Python will not convert
        raise BadLineError(
            f"malformed JSON (an integer of more than {sys.get_int_max_str_digits()} digits, Python's limit)",
            "fix or remove the line (e.g. store the number as a string)",
        ) from None
    if not isinstance(record, dict):
        raise BadLineError(
            f"a JSON {type(record).__name__} where an object was expected",
            "write one JSON object per line",
        )
    # strict UTF-8 decoding refuses surrogates, so only a JSON escape (\uXXXX) can bring one in
    escaped = "\\u" in line
    texts = {}
    for key in keys:
        if key not in record:
            present = ", ".join(f"'{k}'" for k in list(record)[:8]) or "none"
            raise BadLineError(
                f"missing key '{key}' (keys present: {present})",
                f"set {key_flag} to the key that holds the text",
            )
        value = record[key]
        if value is None:
            value = ""
        if not isinstance(value, str):
            raise BadLineError(
                f"key '{key}' holds a JSON {type(value).__name__}, not a string",
                "store the text as a JSON string",
            )
        if escaped:
            _check_surrogates(key, value)
        texts[key] = value
    return texts


def _check_surrogates(key: str, text: str) -> None:
    """BadLineError for a lone surrogate in ``text``: JSON can spell one (``"\\ud800"``) although
    it is no Unicode character, so no UTF-8 encoder (SentencePiece's included) takes the text."""
    found = _SURROGATE.search(text)
    if found:
        raise BadLineError(
            f"key '{key}' holds an invalid Unicode escape: the lone surrogate \\u{ord(found.group()):04x} at "
            f"character {found.start()} of its text",
            "remove it or write the intended character (a surrogate pair such as \\ud83d\\ude00 is valid)",
        )
