"""CRC32s of MCAP files: fill them in after writing, check them on read.

The rosbags MCAP writer leaves every CRC at 0 ("not computed"), so a bag with flipped bytes reads back without a
word. MCAP (mcap.dev specification) has three CRC32 fields (zlib's CRC-32):

- Chunk ``uncompressed_crc``: over the chunk's uncompressed records;
- DataEnd ``data_section_crc``: over every byte from the start of the file up to the DataEnd record;
- Footer ``summary_crc``: over the summary section through the footer's ``summary_offset_start`` field.

:func:`fill` computes and writes all three in place (records are not moved); :func:`verify` checks every CRC that is
not 0 and raises :class:`McapCrcError` naming the first mismatch. Only uncompressed chunks are filled or checked
(the writer used here does not compress); a compressed chunk's CRC is left as it is.
"""
from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Dict, Iterator, Tuple, Union

MAGIC = b"\x89MCAP0\r\n"
OP_FOOTER, OP_CHUNK, OP_DATA_END = 0x02, 0x06, 0x0F


class McapCrcError(ValueError):
    """An MCAP file whose bytes do not match a recorded CRC (or that is not MCAP at all)."""


def _records(data: bytes, path) -> Iterator[Tuple[int, int, int]]:
    """(opcode, record start, body start) of every record of the file, in order."""
    if data[:8] != MAGIC or data[-8:] != MAGIC:
        raise McapCrcError(f"{path}: not an MCAP file (missing magic bytes)")
    pos, end = 8, len(data) - 8
    while pos < end:
        if pos + 9 > end:
            raise McapCrcError(f"{path}: truncated record header at byte {pos}")
        op = data[pos]
        ln = struct.unpack_from("<Q", data, pos + 1)[0]
        if pos + 9 + ln > end:
            raise McapCrcError(f"{path}: record at byte {pos} (opcode 0x{op:02x}) runs past the end of the file")
        yield op, pos, pos + 9
        pos += 9 + ln


def _chunk_records(data: bytes, body: int) -> Tuple[int, bytes, slice]:
    """-> (offset of uncompressed_crc, compression, slice of the records) of the chunk whose body starts at ``body``."""
    crc_at = body + 24  # message_start_time, message_end_time, uncompressed_size (3 x u64)
    n = struct.unpack_from("<I", data, body + 28)[0]
    compression = bytes(data[body + 32: body + 32 + n])
    rl_at = body + 32 + n
    rl = struct.unpack_from("<Q", data, rl_at)[0]
    return crc_at, compression, slice(rl_at + 8, rl_at + 8 + rl)


def _layout(data, path) -> Dict[str, object]:
    chunks, data_end, footer = [], None, None
    for op, start, body in _records(data, path):
        if op == OP_CHUNK:
            chunks.append((start, *_chunk_records(data, body)))
        elif op == OP_DATA_END:
            data_end = (start, body)
        elif op == OP_FOOTER:
            footer = body
    return {"chunks": chunks, "data_end": data_end, "footer": footer}


def fill(path: Union[str, Path]) -> int:
    """Write the CRCs of an MCAP file in place; returns how many fields were set."""
    path = Path(path)
    data = bytearray(path.read_bytes())
    lay = _layout(data, path)
    n = 0
    for _, crc_at, compression, rec in lay["chunks"]:
        if compression == b"":
            struct.pack_into("<I", data, crc_at, zlib.crc32(data[rec]))
            n += 1
    if lay["data_end"] is not None:
        start, body = lay["data_end"]
        struct.pack_into("<I", data, body, zlib.crc32(data[:start]))
        n += 1
    if lay["footer"] is not None:
        body = lay["footer"]
        summary_start = struct.unpack_from("<Q", data, body)[0]
        if summary_start:
            struct.pack_into("<I", data, body + 16, zlib.crc32(data[summary_start: body + 16]))
            n += 1
    path.write_bytes(bytes(data))
    return n


def verify(path: Union[str, Path]) -> int:
    """Check every non-zero CRC of an MCAP file; returns how many were checked. Raises McapCrcError."""
    path = Path(path)
    data = path.read_bytes()
    lay = _layout(data, path)
    n = 0
    for k, (start, crc_at, compression, rec) in enumerate(lay["chunks"]):
        want = struct.unpack_from("<I", data, crc_at)[0]
        if want and compression == b"":
            got = zlib.crc32(data[rec])
            if got != want:
                raise McapCrcError(f"{path}: chunk {k} (byte {start}) is corrupt: CRC32 {got:08x} != recorded "
                                   f"{want:08x}")
            n += 1
    if lay["data_end"] is not None:
        start, body = lay["data_end"]
        want = struct.unpack_from("<I", data, body)[0]
        if want:
            got = zlib.crc32(data[:start])
            if got != want:
                raise McapCrcError(f"{path}: data section is corrupt: CRC32 {got:08x} != recorded {want:08x}")
            n += 1
    if lay["footer"] is not None:
        body = lay["footer"]
        summary_start, _, want = struct.unpack_from("<QQI", data, body)
        if summary_start and want:
            got = zlib.crc32(data[summary_start: body + 16])
            if got != want:
                raise McapCrcError(f"{path}: summary section is corrupt: CRC32 {got:08x} != recorded {want:08x}")
            n += 1
    return n
