"""Reading the evaluation sets' files as distributed: bytes (gzip or not), their text, and their
rows (lines, CSV, TSV), each check failing with one :class:`InputError` that names the file and,
where there is one, the line.

What every reader refuses rather than loads wrong: a path that cannot be read (a directory, no
permission); a UTF-16 or UTF-32 file (its text would come out as every other character a NUL); a
file with no example; a CSV row whose quotes do not close (it would swallow the rows after it) or
whose field count differs from the header's (an unquoted comma would cut the text short); a TSV row
with too few or too many fields. Line endings may be LF, CRLF or CR alone.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import zlib
from collections.abc import Sequence
from pathlib import Path

from ..errors import InputError

__all__ = ["csv_rows", "decode", "label", "lines", "read_bytes", "read_text", "tsv_rows"]


def _latin1_fallback(err: UnicodeDecodeError):
    # Windows-1252 leaves 0x81, 0x8D, 0x8F, 0x90, 0x9D undefined: read those as Latin-1 (C1 controls).
    return err.object[err.start : err.end].decode("latin-1"), err.end


codecs.register_error("fastmlstm.latin1", _latin1_fallback)

_BOM = b"\xef\xbb\xbf"
_WIDE_BOMS = {codecs.BOM_UTF32_LE: "UTF-32", codecs.BOM_UTF32_BE: "UTF-32", codecs.BOM_UTF16_LE: "UTF-16",
              codecs.BOM_UTF16_BE: "UTF-16"}  # UTF-32 LE first: it begins with UTF-16 LE's mark


def read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped if they are gzip (whatever the name says)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None
    if data[:2] == b"\x1f\x8b":  # gzip magic, whatever the name says
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise InputError(f"{path} is a damaged gzip file ({exc})") from None
    return data


def _wide_encoding(data: bytes) -> str | None:
    """'UTF-16' / 'UTF-32' when ``data`` is text in one of them (a byte-order mark, or a NUL in at
    least a quarter of its first 4 KiB: no text of these sets has NULs), else None."""
    for bom, name in _WIDE_BOMS.items():
        if data.startswith(bom):
            return name
    head = data[:4096]
    return "UTF-16" if head and head.count(0) * 4 >= len(head) else None


def decode(data: bytes) -> str:
    """Text of a distributed file: UTF-8 when the whole file is valid UTF-8; otherwise UTF-8 line
    by line with Windows-1252 for lines that are not. A leading byte-order mark is dropped.

    Example::

        >>> decode(b"caf\\xe9 ok\\nna\\xc3\\xafve")   # a Windows-1252 line and a UTF-8 line
        'café ok\\nnaïve'
    """
    data = data.removeprefix(_BOM)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    out = []
    for line in data.split(b"\n"):
        try:
            out.append(line.decode("utf-8"))
        except UnicodeDecodeError:
            out.append(line.decode("cp1252", errors="fastmlstm.latin1"))
    return "\n".join(out)


def read_text(path: Path) -> str:
    """The file's text (:func:`decode`); a UTF-16/UTF-32 file is refused, naming it."""
    data = read_bytes(path)
    if (wide := _wide_encoding(data)) is not None:
        raise InputError(f"{path} looks like {wide} text; these files are UTF-8 (or Windows-1252): save it as UTF-8")
    return decode(data)


def _numbered_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, line) of a text file, without line endings (LF, CRLF or a lone CR)."""
    text = read_text(path).replace("\r\n", "\n").replace("\r", "\n")
    return list(enumerate(text.split("\n"), start=1))


def _some(rows: list, path: Path) -> list:
    if not rows:
        raise InputError(f"{path} holds no examples (an empty file?)")
    return rows


def lines(path: Path) -> list[str]:
    """Non-blank lines, each without its line ending; a file without any is an error."""
    return _some([line for _, line in _numbered_lines(path) if line.strip()], path)


def csv_rows(path: Path, *, header: Sequence[str] | None, fields: int | None = None) -> list[tuple[int, list[str]]]:
    """(line number, fields) of a CSV file's non-blank rows. With ``header``, the first row must
    begin with those names and is dropped; every row must then have as many fields as it (without
    one, ``fields``). A file with no row past the header is an error."""
    limit = csv.field_size_limit()
    csv.field_size_limit(max(limit, 1 << 26))
    reader = csv.reader(io.StringIO(read_text(path), newline=""), strict=True)
    rows, start = [], 1
    try:
        for row in reader:
            if row:
                rows.append((start, row))
            start = reader.line_num + 1
    except csv.Error as exc:  # e.g. a quote that never closes: the rest of the file would be one field
        raise InputError(f"{path}, line {start}: malformed CSV: {exc} (a quote that is not closed?)") from None
    finally:
        csv.field_size_limit(limit)
    if header is not None:
        if not rows or [c.strip().lower() for c in rows[0][1][: len(header)]] != list(header):
            got = rows[0][1][: len(header)] if rows else "an empty file"
            raise InputError(f"{path}: expected a header row {','.join(header)}, got {got}")
        fields = len(rows[0][1])
        rows = rows[1:]
    for line, row in rows:
        if fields is not None and len(row) != fields:
            raise InputError(f"{path}, line {line}: {len(row)} fields where {fields} are expected"
                             f"{' (the header has ' + str(fields) + ')' if header else ''}; an unquoted comma?")
    return _some(rows, path)


def tsv_rows(path: Path, n_fields: int, header_first: str, max_fields: int | None = None
             ) -> list[tuple[int, list[str]]]:
    """(line number, fields) of a tab-separated file without quoting, a header line (its first
    field ``header_first``) skipped if present; each row has ``n_fields`` to ``max_fields`` fields."""
    rows = []
    most = max_fields or n_fields
    for number, line in _numbered_lines(path):
        if not line.strip():
            continue
        row = line.split("\t")  # no quoting: MSRP's sentences contain bare quotes
        if number == 1 and row[0].strip() == header_first:
            continue
        if not n_fields <= len(row) <= most:
            want = n_fields if most == n_fields else f"{n_fields} to {most}"
            raise InputError(f"{path}, line {number}: expected {want} tab-separated fields, got {len(row)}")
        rows.append((number, row))
    return _some(rows, path)


def label(value: str, path: Path, line: int, mapping: dict[str, int]) -> int:
    try:
        return mapping[value.strip()]
    except KeyError:
        raise InputError(f"{path}, line {line}: label {value!r} is not one of {sorted(mapping)}") from None
