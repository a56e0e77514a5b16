"""A real ENOSPC: the spool on a small tmpfs fills up while results are written. The failure is
recorded once space returns (never stuck in 'processing'), the node keeps answering, and the job
can be retried to completion."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dicomnode.cli import app
from dicomnode.config import config_from_dict
from dicomnode.journal import JobState
from dicomnode.node import Node
from tests.support.dicomfactory import make_series
from tests.support.doubles import CopyProcessor
from tests.support.nodehelpers import make_raw_config, wait_for, write_toml
from tests.support.peers import dcmtk, run

pytestmark = pytest.mark.integration


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "spool"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(path: Path) -> Path:
    """Write until the file system is full."""
    ballast = path / "ballast"
    with ballast.open("wb") as fh:
        try:
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()
        except OSError:
            pass
    return ballast


def test_disk_full_while_results_are_written(tmp_path, port, small_disk):
    raw = make_raw_config(tmp_path, port, series={"quiet_seconds": 1.0, "settle_seconds": 0.1},
                          rules={"min_slices": 3}, node={"storage_dir": str(small_disk / "store")})
    toml = write_toml(tmp_path / "node.toml", raw)
    files = make_series(tmp_path / "in", slices=6, rows=512, cols=512)
    with Node(config_from_dict(raw), CopyProcessor(delay=3.0)) as node:
        run([dcmtk("storescu"), "-aec", "DICOMNODE", "127.0.0.1", str(port), *map(str, files)])
        assert wait_for(lambda: node.journal.jobs([JobState.PROCESSING]), 20)
        ballast = fill(small_disk)  # the outputs (3 MB) and the journal's next write no longer fit
        assert wait_for(lambda: node.worker._unrecorded, 20), "the failure should be waiting for the journal"
        (job,) = node.journal.jobs()
        assert job.state == JobState.PROCESSING  # what the journal still says, for now
        assert run([dcmtk("echoscu"), "-aec", "DICOMNODE", "127.0.0.1", str(port)], check=False).returncode == 0
        ballast.unlink()  # space returns
        assert wait_for(lambda: node.journal.job(job.id).state == JobState.FAILED, 10)
        assert "No space left on device" in node.journal.job(job.id).error
        r = CliRunner().invoke(app, ["queue", "retry", "--config", str(toml), str(job.id)])
        assert r.exit_code == 0, r.output
        assert wait_for(lambda: node.journal.job(job.id).state == JobState.DONE, 30)
        assert node.journal.job(job.id).outputs == 6
