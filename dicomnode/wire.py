"""The structure of a received data set, checked to its last byte before it is acknowledged.

pydicom reads a value that is cut short (a data set truncated mid-element, or an element that
declares 0xFFFFFFF0 bytes with 1 kB present) without complaint, so a damaged instance would be
stored and acknowledged. This walks the element headers of the encoded bytes instead: every
defined length must fit, every undefined-length sequence, item and fragment list must be closed,
and nothing may be left over. It reads no values, so it costs microseconds per instance.
"""

from __future__ import annotations

import math
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


def split_part10(data: bytes) -> tuple[dict[int, str], int]:
    """The File Meta Information of a Part 10 file in `data` (PS3.10 7.1: 128-byte preamble,
    'DICM', group 0002 in Explicit VR Little Endian): (element -> value as text, offset of the
    data set). Raises MalformedDataSet when it is not a Part 10 file or its meta group is broken."""
    if len(data) < 132 or data[128:132] != b"DICM":
        raise MalformedDataSet("not a DICOM Part 10 file (no 'DICM' after the 128-byte preamble)")
    meta: dict[int, str] = {}
    pos = 132
    while pos + 8 <= len(data):
        group, element = struct.unpack_from("<HH", data, pos)
        if group != 0x0002:
            break
        vr = data[pos + 4:pos + 6]
        if vr in LONG_VRS:
            if pos + 12 > len(data):
                raise MalformedDataSet(f"file meta element (0002,{element:04X}) truncated at byte {pos}")
            length, start = struct.unpack_from("<I", data, pos + 8)[0], pos + 12
        else:
            length, start = struct.unpack_from("<H", data, pos + 6)[0], pos + 8
        if length == UNDEFINED or start + length > len(data):
            raise MalformedDataSet(f"file meta element (0002,{element:04X}) runs past the end of the data")
        if vr == b"UI":
            meta[element] = data[start:start + length].rstrip(b"\x00 ").decode("ascii", "replace")
        pos = start + length
    if 0x0010 not in meta:
        raise MalformedDataSet("file meta has no Transfer Syntax UID (0002,0010)")
    return meta, pos


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


# -- the image it describes ---------------------------------------------------------------------
BITS_ALLOCATED = frozenset({1, 8, 16, 32, 64})  # PS3.5 8.1.1 and PS3.3 C.7.6.3.1.1
MAX_FRAME_BYTES = 1 << 31  # one decoded frame larger than 2 GiB is no image this node can use
# Image Pixel, Image Plane, Multi-frame, Modality and VOI LUT attributes whose values the node
# reads as numbers: keyword -> (number of values or 0 for any, integer?)
NUMERIC = {
    "ImagePositionPatient": (3, False), "ImageOrientationPatient": (6, False), "PixelSpacing": (2, False),
    "SliceThickness": (1, False), "SpacingBetweenSlices": (1, False), "SliceLocation": (1, False),
    "NumberOfFrames": (1, True), "ImagesInAcquisition": (1, True), "InstanceNumber": (1, True),
    "RescaleSlope": (1, False), "RescaleIntercept": (1, False), "WindowCenter": (0, False), "WindowWidth": (0, False),
}


def check_image(ds, *, encapsulated: bool) -> None:
    """Raise MalformedDataSet unless the image the data set describes adds up: numeric values
    that parse and are finite, dimensions that are not zero, a Bits Allocated the standard
    knows, and (for native transfer syntaxes) Pixel Data at least as long as Rows x Columns x
    Samples per Pixel x Bits Allocated x Number of Frames say. Values are named, never quoted."""
    for keyword, (vm, integer) in NUMERIC.items():
        _check_numbers(ds, keyword, vm, integer)
    if "PixelData" not in ds:
        return
    shape = {}
    for keyword in ("Rows", "Columns", "BitsAllocated", "SamplesPerPixel"):
        value = ds.get(keyword)
        if not isinstance(value, int):
            raise MalformedDataSet(f"Pixel Data without a numeric {keyword}")
        shape[keyword] = value
    if shape["Rows"] < 1 or shape["Columns"] < 1:
        raise MalformedDataSet(f"an image of {shape['Rows']} x {shape['Columns']} pixels")
    if shape["BitsAllocated"] not in BITS_ALLOCATED:
        raise MalformedDataSet(f"Bits Allocated {shape['BitsAllocated']} is not one of {sorted(BITS_ALLOCATED)}")
    if not 1 <= shape["SamplesPerPixel"] <= 4:
        raise MalformedDataSet(f"Samples per Pixel {shape['SamplesPerPixel']}")
    stored = ds.get("BitsStored")
    if isinstance(stored, int) and not 1 <= stored <= shape["BitsAllocated"]:
        raise MalformedDataSet(f"Bits Stored {stored} with Bits Allocated {shape['BitsAllocated']}")
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames < 1:
        raise MalformedDataSet(f"Number of Frames {frames}")
    frame_bits = shape["Rows"] * shape["Columns"] * shape["SamplesPerPixel"] * shape["BitsAllocated"]
    if frame_bits // 8 > MAX_FRAME_BYTES:
        raise MalformedDataSet(f"one frame of {shape['Rows']} x {shape['Columns']} pixels would decode to "
                               f"{frame_bits // 8 >> 20} MiB")
    if encapsulated:
        return
    expected = (frame_bits * frames + 7) // 8
    have = _value_length(ds, 0x7FE00010)
    if have < expected:
        raise MalformedDataSet(f"Pixel Data has {have} bytes; {shape['Rows']} x {shape['Columns']} x "
                               f"{shape['SamplesPerPixel']} samples x {shape['BitsAllocated']} bits x {frames} "
                               f"frame(s) need {expected}")


def _check_numbers(ds, keyword: str, vm: int, integer: bool) -> None:
    if keyword not in ds:
        return
    elem = ds.get_item(keyword)
    raw = elem.value
    if raw is None or raw in (b"", ""):
        return
    if isinstance(raw, bytes):
        texts = raw.decode("ascii", "replace").strip(" \x00").split("\\")
    else:
        values = raw if isinstance(raw, (list, tuple)) or type(raw).__name__ == "MultiValue" else [raw]
        texts = [str(v) for v in values]
    if vm and len(texts) != vm:
        raise MalformedDataSet(f"{keyword} has {len(texts)} values, not {vm}")
    for text in texts:
        try:
            number = float(text.strip())
        except ValueError:
            raise MalformedDataSet(f"{keyword} holds a value that is not {'an integer' if integer else 'a number'}") from None
        if not math.isfinite(number):
            raise MalformedDataSet(f"{keyword} holds a value that is not finite")
        if integer and not number.is_integer():  # "12.0", as some writers put it in an IS, is 12
            raise MalformedDataSet(f"{keyword} holds a value that is not an integer")
        if keyword == "NumberOfFrames" and number < 1:
            raise MalformedDataSet("Number of Frames is below 1")


def _value_length(ds, tag: int) -> int:
    elem = ds.get_item(tag)
    value = elem.value
    return len(value) if value is not None else 0
