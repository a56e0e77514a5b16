"""The journal migrates forward and refuses what it does not know.

`tests/data/journal_schema1.py` is the journal module as released with schema 1 (kept verbatim),
so the migration is tested against a file the old code really wrote."""

from __future__ import annotations

import importlib.util
import sqlite3
import sys
import threading
import time
from pathlib import Path

import pytest

from dicomnode.journal import MIGRATIONS, SCHEMA_VERSION, Instance, JobState, Journal, JournalError

OLD = Path(__file__).parent / "data" / "journal_schema1.py"


def old_journal_module():
    spec = importlib.util.spec_from_file_location("journal_schema1", OLD)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def instance(uid: str, series: str = "1.2.3.4") -> Instance:
    return Instance(sop_instance_uid=uid, series_uid=series, study_uid="1.2.3", sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
                    transfer_syntax="1.2.840.10008.1.2.1", path=f"/spool/{uid}.dcm", size=10, calling_aet="PACS",
                    received_at=time.time(), images_in_acquisition=2, number_of_frames=None, position=None)


def test_a_schema_1_journal_is_migrated_and_keeps_its_jobs(tmp_path):
    old = old_journal_module()
    path = tmp_path / "journal.sqlite"
    j = old.Journal(path)
    job_id, _ = j.record_instance(old.Instance(**instance("1.2.3.4.1").__dict__))
    j.transition(job_id, "complete")
    j.transition(job_id, "selected", rule="default")
    j.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 0
        assert "attempts" not in [r[1] for r in db.execute("PRAGMA table_info(jobs)")]

    journal = Journal(path)
    job = journal.job(job_id)
    assert job.state is JobState.SELECTED and job.rule == "default" and job.attempts == 0
    assert [i.sop_instance_uid for i in journal.instances("1.2.3.4")] == ["1.2.3.4.1"]
    assert journal.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == len(MIGRATIONS)
    assert journal.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == str(SCHEMA_VERSION)
    journal.transition(job_id, "processing")
    journal.transition(job_id, "selected", attempts=1)
    assert journal.job(job_id).attempts == 1
    journal.close()
    assert Journal(path).migrate() == SCHEMA_VERSION  # opening again changes nothing


def test_a_new_journal_is_created_at_the_current_schema(tmp_path):
    journal = Journal(tmp_path / "j.sqlite")
    assert journal.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_a_journal_from_a_newer_dicomnode_is_refused(tmp_path):
    path = tmp_path / "journal.sqlite"
    Journal(path).close()
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(JournalError, match=rf"schema {SCHEMA_VERSION + 1}, newer than this dicomnode's "
                                           rf"\({SCHEMA_VERSION}\); upgrade dicomnode"):
        Journal(path)


def test_states_are_an_enum_that_compares_with_the_stored_strings(tmp_path):
    journal = Journal(tmp_path / "j.sqlite")
    job_id, _ = journal.record_instance(instance("1.2.3.4.1"))
    job = journal.job(job_id)
    assert isinstance(job.state, JobState) and job.state == "received" and f"{job.state}" == "received"


def test_series_locks_are_pruned_when_unheld(tmp_path):
    journal = Journal(tmp_path / "j.sqlite")
    for n in range(1000):
        with journal.series_lock(f"1.2.{n}"):
            pass
    assert journal._series_locks == {}
    # and they still exclude: a second holder waits for the first
    order = []

    def second():
        with journal.series_lock("1.2.3"):
            order.append("second")

    with journal.series_lock("1.2.3"):
        t = threading.Thread(target=second)
        t.start()
        time.sleep(0.2)
        order.append("first")
    t.join(5)
    assert order == ["first", "second"] and journal._series_locks == {}
