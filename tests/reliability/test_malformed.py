"""A corpus of malformed data sets, each sent as its bytes are, with the DIMSE status it must get.
Nothing malformed is acknowledged 0x0000 or kept; the node keeps serving throughout."""

from __future__ import annotations

import struct
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag
from pydicom.uid import CTImageStorage
from pynetdicom import AE

from dicomnode.node import Node
from dicomnode.wire import MalformedDataSet, check_encoded, check_image
from tests.support.dicomfactory import make_series
from tests.support.nodehelpers import make_config
from tests.support.peers import dcmtk, run

pytestmark = pytest.mark.integration


def part10(ds) -> bytes:
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def split(data: bytes) -> tuple[bytes, bytes]:
    meta_len = int.from_bytes(data[140:144], "little")
    return data[:144 + meta_len], data[144 + meta_len:]


def raw(keyword: str, value: bytes) -> RawDataElement:
    """An element written with exactly these bytes (pydicom would refuse to encode the value)."""
    from pydicom.datadict import dictionary_VR

    tag = Tag(keyword)
    return RawDataElement(tag, dictionary_VR(tag), len(value), value, 0, False, True)


def corpus(tmp_path: Path) -> dict[str, tuple[Path, int]]:
    """name -> (file, expected status)."""
    src = make_series(tmp_path / "src", slices=1, rows=32, cols=32)[0]
    good = dcmread(src)
    out: dict[str, bytes] = {"intact": part10(good)}
    meta, body = split(out["intact"])
    out["truncated mid-element"] = meta + body[:-100]
    pixel_tag = b"\xe0\x7f\x10\x00OW\x00\x00"
    at = body.index(pixel_tag) + len(pixel_tag)
    out["pixel data declares 0xFFFFFFF0 bytes"] = meta + body[:at] + struct.pack("<I", 0xFFFFFFF0) + body[at + 4:at + 1028]
    at = body.index(b"\x10\x00\x10\x00")  # (0010,0010) Patient Name, short VR: 2-byte length
    out["an element longer than the data set"] = meta + body[:at + 6] + struct.pack("<H", 0xFFF0) + body[at + 8:at + 40]
    out["stray bytes after the last element"] = meta + body + b"\x01\x02\x03"
    mr = b"1.2.840.10008.5.1.4.1.1.4\x00"  # the command will say CT (from the file meta), the data set MR
    assert meta.count(mr) == 1 and len(CTImageStorage) == len(mr) - 1
    out["CT in the command, MR in the data set"] = meta.replace(mr, CTImageStorage.encode() + b"\x00") + body
    ds = dcmread(src)
    del ds.SOPInstanceUID
    out["no SOP Instance UID in the data set"] = part10(ds)
    ds = dcmread(src)
    del ds.StudyInstanceUID
    ds.add_new(0x0020000D, "US", 11825)
    out["Study Instance UID with VR US"] = part10(ds)
    for name, keyword, value in (("Image Position (Patient) a\\b\\c", "ImagePositionPatient", b"a\\b\\c "),
                                 ("Slice Thickness abc", "SliceThickness", b"abc "),
                                 ("Number of Frames -5", "NumberOfFrames", b"-5"),
                                 ("a NaN in Image Position (Patient)", "ImagePositionPatient", b"0\\NaN\\0 "),
                                 ("Pixel Spacing with one value", "PixelSpacing", b"0.5 ")):
        ds = dcmread(src)
        ds[keyword] = raw(keyword, value)
        out[name] = part10(ds)
    for name, keyword, number in (("Rows 65535", "Rows", 65535), ("Columns 0", "Columns", 0),
                                  ("Bits Allocated 7", "BitsAllocated", 7)):
        ds = dcmread(src)
        setattr(ds, keyword, number)
        out[name] = part10(ds)
    ds = dcmread(src)
    ds.PixelData = ds.PixelData[:len(ds.PixelData) // 2]
    out["Pixel Data half as long as the image"] = part10(ds)
    expected = {"intact": 0x0000, "CT in the command, MR in the data set": 0xA900}
    files = {}
    for name, data in out.items():
        path = tmp_path / f"{len(files):02d}.dcm"
        path.write_bytes(data)
        files[name] = (path, expected.get(name, 0xC000))
    return files


@pytest.fixture
def send_files_as_they_are(monkeypatch):
    """pynetdicom sends a file's bytes unread, the command taken from its file meta information."""
    from pynetdicom import _config

    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


def test_malformed_data_sets_get_the_right_status_and_are_not_kept(tmp_path, port, send_files_as_they_are):
    cases = corpus(tmp_path)
    with Node(make_config(tmp_path, port)) as node:
        ae = AE(ae_title="FUZZ")
        for path, _ in cases.values():
            meta = dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"]).file_meta
            ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
        got = {}
        for name, (path, _) in cases.items():  # one association per case: a bad one must not spoil the next
            assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
            assert assoc.is_established, name
            status = assoc.send_c_store(path)
            got[name] = int(status.Status) if status else None
            assoc.release()
        print("\n".join(f"{name}: 0x{status:04X}" for name, status in got.items()))
        assert got == {name: want for name, (_, want) in cases.items()}
        assert node.journal.instance_count() == 1  # only the intact one
        stored = list((tmp_path / "store" / "incoming").rglob("*.dcm"))
        assert len(stored) == 1
        run([dcmtk("echoscu"), "-aec", "DICOMNODE", "127.0.0.1", str(port)])


def test_the_structure_check_accepts_what_dcmtk_writes(tmp_path):
    """Sequences (defined and undefined length), encapsulated pixel data: real files pass."""
    src = make_series(tmp_path / "src", slices=1, rows=32, cols=32)[0]
    out = tmp_path / "rle.dcm"
    run([dcmtk("dcmcrle"), str(src), str(out)])
    for path, implicit in ((src, False), (out, False)):
        _, body = split(path.read_bytes())
        check_encoded(body, implicit_vr=implicit, little_endian=True)
    with pytest.raises(MalformedDataSet, match="declares"):
        check_encoded(body[:-10], implicit_vr=False, little_endian=True)


def test_an_invalid_uid_is_refused_without_its_value_in_the_log(tmp_path, port, caplog):
    """A patient name typed into a UID field is PHI: the node says which UID is wrong, not what it holds."""
    src = make_series(tmp_path / "src", slices=1, rows=32, cols=32)[0]
    ds = dcmread(src)
    ds["SeriesInstanceUID"] = raw("SeriesInstanceUID", b"CANARY^PHIPATIENT\x00")
    path = tmp_path / "canary.dcm"
    path.write_bytes(part10(ds))
    with Node(make_config(tmp_path, port)) as node:
        ae = AE(ae_title="SCANNER")
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
        status = assoc.send_c_store(path)
        assoc.release()
        assert int(status.Status) == 0xC000 and node.journal.instance_count() == 0
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert any("Series Instance UID is not a valid UID" in m for m in refusals), refusals
    assert "CANARY" not in caplog.text and "PHIPATIENT" not in caplog.text


@pytest.mark.parametrize("rows, cols, samples, bits, frames, length, ok", [
    (10, 10, 1, 1, 1, 14, True),  # 100 bits packed: 13 bytes, padded to 14
    (10, 10, 1, 1, 1, 12, False),
    (4, 4, 3, 8, 1, 48, True),  # RGB
    (4, 4, 3, 8, 1, 47, False),
    (4, 4, 1, 16, 3, 96, True),  # 3 frames of 32 bytes
    (4, 4, 1, 16, 3, 64, False),
    (4, 4, 1, 16, 1, 34, True),  # trailing padding is tolerated, as pydicom tolerates it
])
def test_native_pixel_data_must_hold_what_its_description_says(rows, cols, samples, bits, frames, length, ok):
    from pydicom import Dataset

    ds = Dataset()
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored = rows, cols, samples, bits, bits
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = b"\0" * length
    if ok:
        check_image(ds, encapsulated=False)
    else:
        with pytest.raises(MalformedDataSet, match="Pixel Data has"):
            check_image(ds, encapsulated=False)
    check_image(ds, encapsulated=True)  # compressed: the length says nothing


def test_an_integer_string_written_as_12_point_0_is_an_integer():
    from pydicom import Dataset

    for value, ok in ((b"12.0 ", True), (b"12 ", True), (b"1.5 ", False), (b"NaN ", False), (b"12a ", False)):
        ds = Dataset()
        ds["InstanceNumber"] = raw("InstanceNumber", value)
        if ok:
            check_image(ds, encapsulated=False)
        else:
            with pytest.raises(MalformedDataSet, match="InstanceNumber"):
                check_image(ds, encapsulated=False)
