import pytest

from dicomnode.spool import InvalidUID, Spool, check_uid, write_atomic


@pytest.mark.parametrize("uid", ["../../etc/passwd", "1.2/3", "1.2.3 /x", "", "1." * 40, "1.2.abc", "1..2", ".1"])
def test_unsafe_uids_are_rejected(uid):
    with pytest.raises(InvalidUID):
        check_uid(uid, "uid")


def test_padded_uid_is_accepted():
    assert check_uid("1.2.3\x00", "uid") == "1.2.3"


def test_paths_stay_inside_the_spool(tmp_path):
    spool = Spool(tmp_path)
    p = spool.instance_path("1.2.3", "1.2.3.4", "1.2.3.4.5")
    assert p == tmp_path / "incoming" / "1.2.3" / "1.2.3.4" / "1.2.3.4.5.dcm"
    with pytest.raises(InvalidUID):
        spool.instance_path("1.2.3", "..", "1.2")
    with pytest.raises(ValueError):
        spool.remove_tree(tmp_path.parent)


def test_write_atomic_replaces_and_leaves_no_temp_files(tmp_path):
    target = tmp_path / "a" / "f.bin"
    assert write_atomic(target, [b"abc", b"def"]) == 6
    assert write_atomic(target, [b"xyz"]) == 3
    assert target.read_bytes() == b"xyz"
    assert [p.name for p in target.parent.iterdir()] == ["f.bin"]


def test_failed_write_leaves_old_file(tmp_path):
    target = tmp_path / "f.bin"
    write_atomic(target, [b"old"])

    def broken():
        yield b"partial"
        raise OSError("disk on fire")

    with pytest.raises(OSError):
        write_atomic(target, broken())
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_orphan_temporary_files_are_removed_at_start(tmp_path, port):
    """A kill mid-write leaves .tmp-* files; the next start removes them (they were never acknowledged)."""
    from dicomnode.node import Node
    from tests.support.nodehelpers import make_config

    spool = Spool(tmp_path / "store")
    orphan = spool.incoming / "1.2.3" / "1.2.3.4" / ".tmp-abc123"
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"half a file")
    keep = orphan.parent / "1.2.3.4.5.dcm"
    keep.write_bytes(b"an acknowledged instance")
    with Node(make_config(tmp_path, port)):
        assert not orphan.exists() and keep.exists()


def test_log_lines_a_stranger_can_provoke_are_rate_limited():
    import logging

    from dicomnode.logs import RateLimit

    limit = RateLimit(burst=3, window=0.2)
    record = lambda: logging.LogRecord("pynetdicom.dul", logging.ERROR, __file__, 1, "PDU too short", (), None)  # noqa: E731
    assert [limit.filter(record()) for _ in range(10)] == [True] * 3 + [False] * 7
    import time

    time.sleep(0.25)
    later = record()
    assert limit.filter(later) and "[7 similar line(s) suppressed" in later.getMessage()


@pytest.mark.parametrize("sop_class,sop_uid,ts", [
    ("1.2.840.10008.5.1.4.1.1.4", "1.2.3.4", "1.2.840.10008.1.2.1"),       # even and odd lengths
    ("1.2.840.10008.5.1.4.1.1.7", "1.2.3.45", "1.2.840.10008.1.2"),
    ("1.2.840.10008.5.1.4.1.1.4", "2.25." + "9" * 59, "1.2.840.10008.1.2.4.70"),  # 64 characters
])
def test_part10_header_is_what_pydicom_writes_for_pynetdicoms_file_meta(sop_class, sop_uid, ts):
    from io import BytesIO

    from pydicom import dcmread
    from pydicom.filewriter import write_file_meta_info
    from pynetdicom.dsutils import create_file_meta

    from dicomnode.spool import part10_header

    expected = BytesIO()
    expected.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(expected, create_file_meta(sop_class_uid=sop_class, sop_instance_uid=sop_uid,
                                                    transfer_syntax=ts), enforce_standard=True)
    assert part10_header(sop_class, sop_uid, ts) == expected.getvalue()
    meta = dcmread(BytesIO(part10_header(sop_class, sop_uid, ts)), force=True).file_meta
    assert (meta.MediaStorageSOPInstanceUID, meta.TransferSyntaxUID) == (sop_uid, ts)
