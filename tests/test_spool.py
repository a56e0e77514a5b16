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
