"""16 scanners sending at once: every association succeeds and every instance is stored once."""

from __future__ import annotations

import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from dicomnode.node import Node

from conftest import dcmtk
from dicomfactory import make_series
from nodehelpers import make_config

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
