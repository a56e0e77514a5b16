"""The receiving side against real DCMTK peers (echoscu, storescu, dcmsend) on loopback."""

import threading
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import JPEG2000Lossless

from dicomnode.node import Node
from tests.support.dicomfactory import make_series
from tests.support.nodehelpers import dataset_bytes, make_config, sop_uid
from tests.support.peers import dcmtk, run
from tests.support.tlscerts import make_certs

pytestmark = pytest.mark.integration


@pytest.fixture
def node(tmp_path, port):
    n = Node(make_config(tmp_path, port, node={"allowed_calling_aets": ["SCANNER"]},
                         series={"quiet_seconds": 30.0})).start()
    yield n
    n.stop()


def mixed_folder(root: Path) -> list[Path]:
    """Four series in four transfer syntaxes: explicit LE, JPEG lossless, RLE (DCMTK) and JPEG 2000."""
    plain = make_series(root / "plain", slices=6, seed=1)
    jpeg = make_series(root / "src_jpeg", slices=6, seed=2, vendor="ge")
    rle = make_series(root / "src_rle", slices=6, seed=3, vendor="philips")
    j2k = make_series(root / "j2k", slices=6, seed=4, vendor="ge_fatsat", rows=64, cols=64)
    out = list(plain)
    for src, tool, sub in ((jpeg, "dcmcjpeg", "jpeg"), (rle, "dcmcrle", "rle")):
        (root / sub).mkdir()
        for p in src:
            dst = root / sub / p.name
            run([dcmtk(tool), str(p), str(dst)])
            out.append(dst)
    for p in j2k:
        ds = dcmread(p)
        ds.compress(JPEG2000Lossless)
        ds.save_as(p, enforce_file_format=True)
        out.append(p)
    for sub in ("src_jpeg", "src_rle"):
        for p in (root / sub).iterdir():
            p.unlink()
        (root / sub).rmdir()
    return out


def test_echoscu(node, port):
    run([dcmtk("echoscu"), "-aec", "DICOMNODE", "-aet", "SCANNER", "127.0.0.1", str(port)])


def test_unknown_calling_or_called_ae_is_rejected_at_association(node, port):
    bad = run([dcmtk("echoscu"), "-aec", "DICOMNODE", "-aet", "INTRUDER", "127.0.0.1", str(port)], check=False)
    assert bad.returncode != 0 and "Calling AE Title Not Recognized" in bad.stdout + bad.stderr
    bad = run([dcmtk("echoscu"), "-aec", "OTHER", "-aet", "SCANNER", "127.0.0.1", str(port)], check=False)
    assert bad.returncode != 0 and "Called AE Title Not Recognized" in bad.stdout + bad.stderr


def test_host_outside_allowlist_is_closed_at_accept(tmp_path, port, caplog):
    """The allowlist is checked on the TCP connection, before any association thread exists."""
    with Node(make_config(tmp_path, port, node={"allowed_hosts": ["10.99.0.0/16"]})) as node:
        threads = threading.active_count()
        bad = run([dcmtk("echoscu"), "-aec", "DICOMNODE", "127.0.0.1", str(port)], check=False)
        assert bad.returncode != 0
        assert "closing connection from 127.0.0.1: not in allowed_hosts" in caplog.text
        assert node.scp._server.pending() == 0 and threading.active_count() <= threads


@pytest.mark.parametrize("sender", ["storescu", "dcmsend"])
def test_store_multi_series_in_several_transfer_syntaxes(node, port, tmp_path, sender):
    files = mixed_folder(tmp_path / "in")
    syntaxes = {str(dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID) for p in files}
    assert len(syntaxes) == 4
    if sender == "storescu":  # storescu proposes one compressed syntax per run: one run per sub-folder
        for sub, flag in (("plain", "-x="), ("jpeg", "-xs"), ("rle", "-xr"), ("j2k", "-xv")):
            run([dcmtk("storescu"), "-aec", "DICOMNODE", "-aet", "SCANNER", flag, "+sd",
                 "127.0.0.1", str(port), str(tmp_path / "in" / sub)])
    else:  # dcmsend proposes each file's own syntax: the whole folder at once, nothing decompressed
        run([dcmtk("dcmsend"), "-aec", "DICOMNODE", "-aet", "SCANNER", "--decompress-never", "+sd", "+r",
             "127.0.0.1", str(port), str(tmp_path / "in")])
    assert node.journal.instance_count() == len(files)
    for src in files:
        rec = node.journal.instance(sop_uid(src))
        assert rec is not None, f"{src} not in the journal"
        assert rec.transfer_syntax == str(dcmread(src, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        assert dataset_bytes(Path(rec.path)) == dataset_bytes(src), f"{src.name}: stored bytes differ"
    assert {j.series_uid for j in node.journal.jobs()} == {
        str(dcmread(p, stop_before_pixels=True).SeriesInstanceUID) for p in files}


def test_resend_is_idempotent(node, port, tmp_path):
    files = make_series(tmp_path / "in", slices=3, declare_size=False)  # stays open between the two sends
    for _ in range(2):
        run([dcmtk("storescu"), "-aec", "DICOMNODE", "-aet", "SCANNER", "127.0.0.1", str(port), *map(str, files)])
    assert node.journal.instance_count() == 3
    assert len(node.journal.jobs()) == 1
    stored = list((tmp_path / "store" / "incoming").rglob("*.dcm"))
    assert len(stored) == 3


def test_unsafe_uid_gets_error_status_and_node_keeps_serving(node, port, tmp_path):
    from pynetdicom import AE

    ds = dcmread(make_series(tmp_path / "in", slices=1)[0])
    ds.SeriesInstanceUID = "1.2.3/../../etc"
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    assert assoc.is_established
    status = assoc.send_c_store(ds)
    assoc.release()
    assert status.Status == 0xC000
    assert not list((tmp_path / "store" / "incoming").rglob("*.dcm"))
    run([dcmtk("echoscu"), "-aec", "DICOMNODE", "-aet", "SCANNER", "127.0.0.1", str(port)])


def test_low_disk_watermark_refuses_with_a700(tmp_path, port):
    cfg = make_config(tmp_path, port, node={"min_free_disk_mb": 10**9})
    files = make_series(tmp_path / "in", slices=1)
    with Node(cfg) as n:
        out = run([dcmtk("storescu"), "-v", "-aec", "DICOMNODE", "127.0.0.1", str(port), str(files[0])], check=False)
        assert "Refused: OutOfResources" in out.stdout + out.stderr  # DCMTK names status 0xA700 so
        assert n.journal.instance_count() == 0


def test_tls_echo_with_client_certificate(tmp_path, port):
    certs = make_certs(tmp_path / "pki")
    cfg = make_config(tmp_path, port, tls={"enabled": True, "cert_file": str(certs["server.crt"]),
                                           "key_file": str(certs["server.key"]), "ca_file": str(certs["ca.crt"])})
    with Node(cfg):
        base = [dcmtk("echoscu"), "-aec", "DICOMNODE", "+tls", str(certs["client.key"]), str(certs["client.crt"]),
                "+cf", str(certs["ca.crt"]), "+px"]
        ok = run(base + ["127.0.0.1", str(port)], check=False)
        assert ok.returncode == 0, ok.stdout + ok.stderr
        plain = run([dcmtk("echoscu"), "-to", "5", "-aec", "DICOMNODE", "127.0.0.1", str(port)], check=False)
        assert plain.returncode != 0


def test_contexts_are_copied_per_association_without_sharing_lists(node):
    import copy

    contexts = node.scp._server.contexts
    dup = copy.deepcopy(contexts)
    assert len(dup) == len(contexts) > 100
    assert [(c.abstract_syntax, c.transfer_syntax) for c in dup] == \
           [(c.abstract_syntax, c.transfer_syntax) for c in contexts]
    dup[0].transfer_syntax.clear()
    assert contexts[0].transfer_syntax  # pynetdicom may edit its copy; the server's stays whole


def test_dul_polls_fast_only_while_an_association_transfers(node, port):
    """pynetdicom's DUL sleeps between polls; the listener shortens that sleep while PDUs flow and
    restores pynetdicom's default once the association has been quiet for ACTIVE_WINDOW."""
    import time

    from pynetdicom import AE

    from dicomnode.listener import ACTIVE_WINDOW, POLL_ACTIVE, POLL_IDLE

    ae = AE(ae_title="SCANNER")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    assert assoc.is_established
    try:
        def delay() -> float:
            (served,) = [a for _, a in node.scp._server._live() if a is not None]
            return served.dul._run_loop_delay

        assert delay() == POLL_ACTIVE  # negotiation just happened
        time.sleep(ACTIVE_WINDOW + 0.4)
        assert delay() == POLL_IDLE
        assert assoc.send_c_echo().Status == 0
        time.sleep(0.25)
        assert delay() == POLL_ACTIVE
    finally:
        assoc.release()
