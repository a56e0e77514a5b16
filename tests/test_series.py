"""Series completion over the network: declared size, quiet period, and across a restart."""

import time

import pytest

from dicomnode.node import Node
from tests.support.dicomfactory import make_series
from tests.support.nodehelpers import make_config
from tests.support.peers import dcmtk, run

pytestmark = pytest.mark.integration


def store(port, files):
    run([dcmtk("storescu"), "-aec", "DICOMNODE", "127.0.0.1", str(port), *map(str, files)])


def wait_settled(node, timeout):
    """Wait until every job has been completed and selected (or ignored)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        jobs = node.journal.jobs()
        if jobs and all(j.state not in ("received", "complete") for j in jobs):
            return jobs
        time.sleep(0.02)
    return node.journal.jobs()


def test_declared_series_completes_within_one_second_of_its_last_instance(tmp_path, port):
    files = make_series(tmp_path / "in", slices=10, declare_size=True)
    with Node(make_config(tmp_path, port, series={"quiet_seconds": 30.0})) as node:
        store(port, files)
        (job,) = wait_settled(node, 10)
        assert job.completion == "declared"  # not the 30 s quiet period


def test_undeclared_series_completes_after_the_quiet_period(tmp_path, port):
    files = make_series(tmp_path / "in", slices=10, declare_size=False)
    with Node(make_config(tmp_path, port, series={"quiet_seconds": 2.0})) as node:
        store(port, files)
        (job,) = wait_settled(node, 5)
        assert job.completion == "quiet"
        last = max(i.received_at for i in node.journal.instances(job.series_uid))
        assert job.completed_at - last >= 2.0  # the exact schedule: tests/test_assemble.py, on a given clock


def test_partial_declared_series_waits_for_the_quiet_period(tmp_path, port):
    files = make_series(tmp_path / "in", slices=10, declare_size=True)
    with Node(make_config(tmp_path, port, series={"quiet_seconds": 2.0})) as node:
        store(port, files[:7])
        (job,) = wait_settled(node, 6)
        assert job.completion == "quiet"


def test_restart_in_the_middle_of_a_series_completes_it_afterwards(tmp_path, port):
    files = make_series(tmp_path / "in", slices=10, declare_size=False)
    cfg = make_config(tmp_path, port, series={"quiet_seconds": 2.0})
    with Node(cfg) as node:
        store(port, files[:5])
        assert node.journal.jobs()[0].state == "received"
    with Node(cfg) as node:  # a new process would see the same journal
        store(port, files[5:])
        (job,) = wait_settled(node, 6)
        assert job.state == "selected"
        assert len(node.journal.instances(job.series_uid)) == 10
    # stopped with the series still pending: the next start completes it from the journal alone
    files2 = make_series(tmp_path / "in2", slices=10, declare_size=False)
    with Node(cfg) as node:
        store(port, files2)
    with Node(cfg) as node:
        jobs = wait_settled(node, 3)
        assert len(jobs) == 2 and all(j.state == "selected" for j in jobs)


def test_late_instance_reopens_and_reprocesses(tmp_path, port):
    files = make_series(tmp_path / "in", slices=10, declare_size=True)
    with Node(make_config(tmp_path, port, series={"quiet_seconds": 2.0})) as node:
        store(port, files[:-1] + files[-1:])
        wait_settled(node, 5)
        store(port, files[-1:])  # re-sent after completion
        time.sleep(0.2)
        jobs = wait_settled(node, 5)
        assert [j.generation for j in jobs] == [1, 2]
        assert jobs[1].completion == "declared"
