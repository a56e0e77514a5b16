"""The structure of a received data set, checked to its last byte before it is acknowledged.

pydicom reads a value that is cut short (a data set truncated mid-element, or an element that
declares 0xFFFFFFF0 bytes with 1 kB present) without complaint, so a damaged instance would be
stored and acknowledged. This walks the element headers of the encoded bytes instead: every
defined length must fit, every undefined-length sequence, item and fragment list must be closed,
and nothing may be left over. It reads no values, so it costs microseconds per instance.
"""

from __future__ import annotations

import struct
import zlib

LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
UNDEFINED = 0xFFFFFFFF
ITEM, ITEM_END, SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
PIXEL_DATA = 0x7FE00010
MAX_DEPTH = 16
MAX_INFLATED = 1 << 30  # a deflated data set may not inflate past 1 GiB


class MalformedDataSet(ValueError):
    """The encoded data set does not parse to its end; the message says where."""


def check_encoded(data: bytes, *, implicit_vr: bool, little_endian: bool, deflated: bool = False) -> None:
    """Raise MalformedDataSet unless `data` is one complete, well-formed data set."""
    if deflated:
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        try:
            data = inflater.decompress(data, MAX_INFLATED)
        except zlib.error as exc:
            raise MalformedDataSet(f"deflated data set does not inflate: {exc}") from None
        if inflater.unconsumed_tail:
            raise MalformedDataSet("deflated data set inflates past 1 GiB")
    _Scanner(data, implicit_vr, "<" if little_endian else ">").elements(0, len(data), until=None, depth=0)


class _Scanner:
    def __init__(self, data: bytes, implicit: bool, order: str):
        self.data, self.implicit, self.order = data, implicit, order

    def _header(self, pos: int, end: int) -> tuple[int, int]:
        if end - pos < 8:
            raise MalformedDataSet(f"{end - pos} stray byte(s) at offset {pos}")
        group, element, length = struct.unpack_from(self.order + "HHI", self.data, pos)
        return (group << 16) | element, length

    def elements(self, pos: int, end: int, *, until: int | None, depth: int, implicit: bool | None = None) -> int:
        """Scan data elements in [pos, end); with `until`, stop after that delimiter. Return the end."""
        implicit = self.implicit if implicit is None else implicit
        if depth > MAX_DEPTH:
            raise MalformedDataSet(f"sequences nested deeper than {MAX_DEPTH}")
        while pos < end:
            tag, length = self._header(pos, end)
            if tag >> 16 == 0xFFFE:
                if tag == until:
                    return pos + 8
                raise MalformedDataSet(f"unexpected delimiter ({tag >> 16:04X},{tag & 0xFFFF:04X}) at offset {pos}")
            vr = None
            if implicit:
                pos += 8
            else:
                vr = self.data[pos + 4:pos + 6]
                if vr in LONG_VRS:
                    if end - pos < 12:
                        raise MalformedDataSet(f"element header cut at offset {pos}")
                    (length,) = struct.unpack_from(self.order + "I", self.data, pos + 8)
                    pos += 12
                else:
                    (length,) = struct.unpack_from(self.order + "H", self.data, pos + 6)
                    pos += 8
            where = f"({tag >> 16:04X},{tag & 0xFFFF:04X})"
            if length == UNDEFINED:
                if tag == PIXEL_DATA and vr in (b"OB", b"OW"):
                    pos = self.items(pos, end, undefined=True, depth=depth, fragments=True)
                elif implicit or vr in (b"SQ", b"UN"):
                    pos = self.items(pos, end, undefined=True, depth=depth + 1, implicit=implicit or vr == b"UN")
                else:
                    raise MalformedDataSet(f"element {where} has an undefined length but is not a sequence")
                continue
            if length > end - pos:
                raise MalformedDataSet(f"element {where} declares {length} bytes but {end - pos} remain")
            if vr == b"SQ":
                self.items(pos, pos + length, undefined=False, depth=depth + 1, implicit=implicit)
            pos += length
        if until is not None:
            raise MalformedDataSet("an item or sequence is not closed before the end of the data set")
        return pos

    def items(self, pos: int, end: int, *, undefined: bool, depth: int, implicit: bool | None = None,
              fragments: bool = False) -> int:
        """Scan the items of a sequence (or the fragments of encapsulated pixel data)."""
        while True:
            if not undefined and pos == end:
                return pos
            tag, length = self._header(pos, end)
            if undefined and tag == SEQUENCE_END:
                return pos + 8
            if tag != ITEM:
                raise MalformedDataSet(f"expected an item at offset {pos}, found ({tag >> 16:04X},{tag & 0xFFFF:04X})")
            pos += 8
            if length == UNDEFINED and not fragments:
                pos = self.elements(pos, end, until=ITEM_END, depth=depth, implicit=implicit)
                continue
            if length > end - pos:
                raise MalformedDataSet(f"an item declares {length} bytes but {end - pos} remain")
            if not fragments:
                self.elements(pos, pos + length, until=None, depth=depth, implicit=implicit)
            pos += length
