"""`dicomnode queue purge`, run in its own process while the node receives the same series again,
never removes an instance the node has acknowledged.

The node writes an instance to the spool, records it in the journal, then acknowledges it. A purge
that removed the series' files between the write and the record would leave an acknowledged
instance recorded without its file. The node here holds the first re-sent instance between write
and record for 3 s (a stand-in for a slow disk), and the purge is started in that window."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dicomnode.config import config_from_dict
from dicomnode.journal import JobState
from dicomnode.node import Node
from tests.support.dicomfactory import make_series
from tests.support.doubles import CopyProcessor
from tests.support.nodehelpers import make_raw_config, sop_uid, wait_for, write_toml
from tests.support.peers import dcmtk, run

pytestmark = pytest.mark.integration

HOLD = 3.0  # seconds the first re-sent instance waits between the spool write and the journal record


def test_a_purge_racing_a_resend_never_removes_an_acknowledged_instance(tmp_path, port):
    raw = make_raw_config(tmp_path, port, series={"quiet_seconds": 1.0, "settle_seconds": 0.1},
                          rules={"min_slices": 3})
    toml = write_toml(tmp_path / "node.toml", raw)
    files = make_series(tmp_path / "in", slices=4)
    store = [dcmtk("storescu"), "-aec", "DICOMNODE", "127.0.0.1", str(port), *map(str, files)]
    with Node(config_from_dict(raw), CopyProcessor()) as node:
        run(store)
        assert wait_for(lambda: [j.state for j in node.journal.jobs()] == [JobState.DONE], 20)

        held = threading.Event()
        record = node.journal.record_instance

        def slow_record(inst, *args, **kwargs):
            if not held.is_set():
                held.set()
                time.sleep(HOLD)
            return record(inst, *args, **kwargs)

        node.journal.record_instance = slow_record
        sender = threading.Thread(target=run, args=(store,), daemon=True)
        sender.start()
        assert held.wait(10)
        purge = subprocess.run([sys.executable, "-m", "dicomnode.cli", "queue", "purge", "--config", str(toml),
                                "--state", "done"], capture_output=True, text=True, timeout=60)
        assert purge.returncode == 0 and "purged 1 job" in purge.stdout, purge.stdout + purge.stderr
        sender.join(30)
        assert not sender.is_alive()  # run() raised in the thread if storescu had failed
        series_uid = node.journal.instances(node.journal.jobs()[-1].series_uid)[0].series_uid
        rows = node.journal.instances(series_uid)
        assert sorted(r.sop_instance_uid for r in rows) == sorted(sop_uid(f) for f in files)
        missing = [r.sop_instance_uid for r in rows if not Path(r.path).is_file()]
        assert not missing, f"{len(missing)} acknowledged instance(s) recorded without their file"
