"""16 scanners sending at once: every association succeeds and every instance is stored once."""

from __future__ import annotations

import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from dicomnode.node import Node
from tests.support.dicomfactory import make_series
from tests.support.nodehelpers import make_config, wait_for
from tests.support.peers import dcmtk

pytestmark = pytest.mark.integration

SENDERS = 16


def test_sixteen_concurrent_senders(tmp_path, port):
    series = [make_series(tmp_path / f"s{k}", slices=4, rows=64, cols=64, seed=k) for k in range(SENDERS)]
    with Node(make_config(tmp_path, port, node={"max_associations": 20})) as node:
        def send(k: int) -> int:
            cmd = [dcmtk("storescu"), "-to", "30", "-aet", f"SCANNER{k}", "-aec", "DICOMNODE", "127.0.0.1", str(port),
                   *map(str, series[k])]
            return subprocess.run(cmd, capture_output=True, timeout=120).returncode

        with ThreadPoolExecutor(SENDERS) as pool:
            codes = list(pool.map(send, range(SENDERS)))
        assert codes == [0] * SENDERS
        assert node.journal.instance_count() == 4 * SENDERS


def test_instances_acknowledged_to_four_concurrent_senders_survive_a_kill(tmp_path):
    """Group commit and the receive path under concurrency: four senders store as fast as they
    can, the node is SIGKILLed mid-transfer, and every instance that got a success status is on
    disk with the bytes that were sent and in the journal."""
    import threading

    from pydicom import dcmread
    from pynetdicom import AE
    from pynetdicom.sop_class import MRImageStorage

    from dicomnode.journal import Journal
    from tests.reliability.test_kills import Serve
    from tests.support.nodehelpers import dataset_bytes, make_raw_config, write_toml
    from tests.support.peers import free_port

    port = free_port()
    toml = write_toml(tmp_path / "node.toml", make_raw_config(tmp_path, port, inference={"model": "none"},
                                                             series={"quiet_seconds": 600.0}))
    files = [make_series(tmp_path / f"s{k}", slices=40, rows=128, cols=128, seed=k) for k in range(4)]
    serve = Serve(toml, port)
    serve.start()
    acked: dict[str, Path] = {}
    lock = threading.Lock()

    def sender(k: int) -> None:
        ae = AE(ae_title=f"SCANNER{k}")
        ae.add_requested_context(MRImageStorage)
        assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
        for f in files[k]:
            try:
                status = assoc.send_c_store(f)
            except (RuntimeError, ValueError, OSError):
                return
            if not status or int(status.Status) != 0:
                return
            with lock:
                acked[str(dcmread(f, stop_before_pixels=True).SOPInstanceUID)] = f
        assoc.release()

    threads = [threading.Thread(target=sender, args=(k,)) for k in range(4)]
    try:
        for t in threads:
            t.start()
        assert wait_for(lambda: len(acked) >= 60, 60)
        serve.kill()
        for t in threads:
            t.join(30)
    finally:
        serve.stop_all()
    assert 60 <= len(acked) < 160  # killed mid-transfer
    journal = Journal(tmp_path / "store" / "journal.sqlite")
    for sop, sent in acked.items():
        row = journal.instance(sop)
        assert row is not None, f"acknowledged {sop} is not in the journal"
        assert dataset_bytes(Path(row.path)) == dataset_bytes(sent), f"acknowledged {sop} differs on disk"
