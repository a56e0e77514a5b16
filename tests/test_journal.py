import datetime
import sqlite3
import time

import pytest

from dicomnode.assemble import declared_size_met
from dicomnode.journal import Instance, Journal, TransitionError, parse_since
from dicomnode.process import recover


def inst(sop, series="1.2.3", n=3, pos=None, t=None):
    return Instance(sop, series, "1.2", "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.1.2.1", f"/x/{sop}.dcm", 10,
                    "SCU", t or time.time(), n, None, pos)


def test_instances_group_into_one_job_and_resend_is_idempotent(tmp_path):
    j = Journal(tmp_path / "j.sqlite")
    a, new_a = j.record_instance(inst("1.1", pos="0\\0\\0"))
    b, new_b = j.record_instance(inst("1.1", pos="0\\0\\0"))
    c, _ = j.record_instance(inst("1.2", pos="0\\0\\1"))
    assert a == b == c and new_a and not new_b
    assert j.instance_count() == 2 and len(j.jobs()) == 1


def test_declared_size(tmp_path):
    j = Journal(tmp_path / "j.sqlite")
    j.record_instance(inst("1.1", pos="0\\0\\0"))
    j.record_instance(inst("1.2", pos="0\\0\\1"))
    assert not declared_size_met(j.series_extent("1.2.3"))
    j.record_instance(inst("1.3", pos="0\\0\\1"))  # same position twice: not a new slice
    assert not declared_size_met(j.series_extent("1.2.3"))
    j.record_instance(inst("1.4", pos="0\\0\\2"))
    assert declared_size_met(j.series_extent("1.2.3"))


@pytest.mark.parametrize("extent, met", [
    ([], False),
    ([(None, None, "0\\0\\0")], False),  # no size declared
    ([(2, None, "0\\0\\0"), (3, None, "0\\0\\1")], False),  # instances disagree
    ([(0, None, None)], False),
    ([(2, None, None), (2, None, None)], True),  # no positions: instances are counted
    ([(2, None, "0\\0\\0"), (2, None, None)], True),
    ([(None, 24, "0\\0\\0")], True),  # a multi-frame instance carries the whole series
    ([(None, 1, "0\\0\\0")], False),
])
def test_declared_size_rule(extent, met):
    assert declared_size_met(extent) is met


def test_state_machine_rejects_illegal_moves(tmp_path):
    j = Journal(tmp_path / "j.sqlite")
    job_id, _ = j.record_instance(inst("1.1"))
    with pytest.raises(TransitionError):
        j.transition(job_id, "processing")
    j.transition(job_id, "complete")
    j.transition(job_id, "selected")
    j.transition(job_id, "processing")
    assert recover(j, []) == [job_id] and j.job(job_id).state == "selected"
    kinds = [e["kind"] for e in j.events(job_id)]
    assert kinds == ["received", "complete", "selected", "processing", "selected"]


def test_late_instance_reopens_as_new_generation(tmp_path):
    j = Journal(tmp_path / "j.sqlite")
    job_id, _ = j.record_instance(inst("1.1"))
    j.transition(job_id, "complete")
    j.transition(job_id, "ignored", reason="test")
    again, _ = j.record_instance(inst("1.2"))
    assert again != job_id and j.job(again).generation == 2 and j.job(again).state == "received"
    j.transition(again, "complete")
    assert j.record_instance(inst("1.3"), late_policy="ignore")[0] is None


def sending_job(tmp_path, destinations=("a", "b")):
    """A journal with one job whose deliveries to `destinations` have just started."""
    j = Journal(tmp_path / "j.sqlite")
    job_id, _ = j.record_instance(inst("1.1"))
    for s in ("complete", "selected", "processing", "encoded"):
        j.transition(job_id, s)
    j.start_deliveries(job_id, list(destinations))
    return j, job_id


def test_deliveries_settle_the_job(tmp_path):
    j, job_id = sending_job(tmp_path)
    assert j.record_attempt(job_id, "a", ok=True) == "sending"
    assert j.record_attempt(job_id, "b", ok=False, error="down", next_attempt_at=time.time() + 60) == "sending"
    assert j.due_deliveries(time.time()) == []
    assert j.record_attempt(job_id, "b", ok=False, error="down", dead=True) == "dead_letter"
    assert j.retry(job_id) == "sending"
    assert [d.destination for d in j.due_deliveries(time.time())] == ["b"]
    assert j.record_attempt(job_id, "b", ok=True) == "done"


def test_recover_hands_encoded_jobs_to_dispatch(tmp_path):
    j = Journal(tmp_path / "j.sqlite")
    job_id, _ = j.record_instance(inst("1.1"))
    for s in ("complete", "selected", "processing", "encoded"):
        j.transition(job_id, s)  # crash here: outputs written, deliveries not yet created
    assert recover(j, ["pacs"]) == [job_id]
    assert j.job(job_id).state == "sending"
    assert [d.destination for d in j.due_deliveries(time.time())] == ["pacs"]


def test_failed_begin_releases_the_write_lock(tmp_path):
    import sqlite3

    j = Journal(tmp_path / "j.sqlite")
    blocker = sqlite3.connect(tmp_path / "j.sqlite", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    j.db.execute("PRAGMA busy_timeout=100")
    with pytest.raises(sqlite3.OperationalError):
        j.record_instance(inst("1.1"))
    blocker.execute("ROLLBACK")
    assert j.record_instance(inst("1.1"))[0] is not None  # not deadlocked


def test_concurrent_instances_are_all_recorded_with_their_own_results(tmp_path):
    """Group commit: eight threads record at once; each gets its own (job, is_new) back."""
    import threading

    j = Journal(tmp_path / "j.sqlite")
    results: dict[str, tuple] = {}

    def sender(k):
        for i in range(40):
            sop = f"1.{k}.{i}"
            results[sop] = j.record_instance(inst(sop, series=f"9.{k}"))

    threads = [threading.Thread(target=sender, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert j.instance_count() == 320
    for k in range(8):
        jobs = {results[f"1.{k}.{i}"][0] for i in range(40)}
        assert len(jobs) == 1 and all(results[f"1.{k}.{i}"][1] for i in range(40))  # one job per series, all new
    assert len({results[f"1.{k}.0"][0] for k in range(8)}) == 8
    assert j.record_instance(inst("1.0.0", series="9.0"))[1] is False  # a re-send, recorded as such


def test_one_failing_instance_in_a_group_commit_does_not_undo_the_others(tmp_path):
    from dicomnode.journal import _Queued

    j = Journal(tmp_path / "j.sqlite")
    bad = inst("1.2", series=None)  # NOT NULL constraint
    batch = [_Queued(inst("1.1"), "reprocess"), _Queued(bad, "reprocess"), _Queued(inst("1.3"), "reprocess")]
    with j._write_lock:
        j._record_batch(batch)
    assert all(item.done for item in batch)
    assert batch[1].error is not None and batch[1].result is None
    assert batch[0].error is None and batch[2].error is None and batch[0].result[0] == batch[2].result[0]
    assert j.instance("1.1") is not None and j.instance("1.3") is not None and j.instance("1.2") is None


class _CommitFails:
    """A journal connection whose next COMMIT fails as on a full disk (SQLITE_FULL)."""

    def __init__(self, conn):
        self.conn, self.armed = conn, True

    def execute(self, sql, *args):
        if self.armed and sql == "COMMIT":
            self.armed = False
            raise sqlite3.OperationalError("database or disk is full")
        return self.conn.execute(sql, *args)

    def __getattr__(self, name):
        return getattr(self.conn, name)


def test_audit_lines_are_written_only_for_committed_changes(tmp_path):
    import json

    audit = tmp_path / "audit.jsonl"
    j = Journal(tmp_path / "j.sqlite", audit_file=audit)
    job_id, _ = j.record_instance(inst("1.1"))
    real = j.db
    j._local.conn = _CommitFails(real)
    with pytest.raises(sqlite3.OperationalError):
        j.transition(job_id, "complete", note="first try")
    j._local.conn = real
    assert j.job(job_id).state == "received"
    lines = [json.loads(x) for x in audit.read_text().splitlines()]
    assert [x["event"] for x in lines] == ["received"]  # nothing for the change that did not happen
    j.transition(job_id, "complete", note="second try")
    lines = [json.loads(x) for x in audit.read_text().splitlines()]
    assert [(x["event"], x["detail"]) for x in lines] == [("received", None), ("complete", "second try")]
    assert [e["kind"] for e in j.events(job_id)] == ["received", "complete"]
    stamp = datetime.datetime.fromisoformat(lines[-1]["time"])  # ISO 8601 with its UTC offset
    assert stamp.utcoffset() is not None and abs(stamp.timestamp() - time.time()) < 60


def test_a_failed_instance_in_a_group_commit_leaves_no_audit_line(tmp_path):
    import json

    audit = tmp_path / "audit.jsonl"
    j = Journal(tmp_path / "j.sqlite", audit_file=audit)
    real = j.db
    j._local.conn = _CommitFails(real)
    with pytest.raises(sqlite3.OperationalError):
        j.record_instance(inst("1.1"))
    j._local.conn = real
    assert not audit.exists() or audit.read_text() == ""
    j.record_instance(inst("1.1"))
    assert [json.loads(x)["event"] for x in audit.read_text().splitlines()] == ["received"]


def test_delivered_instances_go_with_their_delivery(tmp_path):
    j, job_id = sending_job(tmp_path)
    j.record_instance_delivered(job_id, "a", "9.1")
    j.record_instance_delivered(job_id, "a", "9.1")
    assert j.delivered_instances(job_id, "a") == {"9.1"} and j.delivered_instances(job_id, "b") == set()
    j.record_attempt(job_id, "a", ok=True)
    j.record_attempt(job_id, "b", ok=True)
    assert j.job(job_id).state == "done"
    assert j.resend(job_id, ["a"]) == "sending"
    assert j.delivered_instances(job_id, "a") == set()
    assert {d.destination: d.state for d in j.deliveries(job_id)} == {"a": "pending", "b": "delivered"}
    j.record_instance_delivered(job_id, "a", "9.2")
    j.purge_job(job_id)
    assert j.db.execute("SELECT COUNT(*) FROM delivered_instances").fetchone()[0] == 0


def test_since_is_hours_ago_or_an_iso_time():
    now = 1_800_000_000.0
    assert parse_since("24h", now) == now - 86400
    assert parse_since("1.5h", now) == now - 5400
    assert parse_since("2026-12-01T08:00+00:00", now) == datetime.datetime(2026, 12, 1, 8, tzinfo=datetime.UTC).timestamp()
    assert parse_since("2026-12-01", now) == datetime.datetime(2026, 12, 1).timestamp()  # local midnight
    for bad in ("yesterday", "h", "-3h", "24 h"):
        with pytest.raises(ValueError, match="neither an ISO date/time nor hours"):
            parse_since(bad, now)
