"""The completion schedule on a given clock: no sleeping, no timing windows."""

from __future__ import annotations

from dicomnode.assemble import Assembler
from dicomnode.config import SeriesConfig
from dicomnode.journal import Instance, JobState, Journal

T0 = 1_000_000.0


def receive(journal: Journal, series: str, n: int, at: float, declared: int | None, first: int = 0) -> int:
    job_id = None
    for k in range(first, first + n):
        job_id, _ = journal.record_instance(Instance(
            sop_instance_uid=f"{series}.{k + 1}", series_uid=series, study_uid="1.2.3", sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
            transfer_syntax="1.2.840.10008.1.2.1", path=f"/spool/{series}.{k}.dcm", size=1, calling_aet="PACS",
            received_at=at, images_in_acquisition=declared, number_of_frames=None, position=f"{k}.00\\0.00\\0.00"))
    return job_id


def test_quiet_period_on_the_clock(tmp_path):
    journal = Journal(tmp_path / "j.sqlite")
    assembler = Assembler(SeriesConfig(quiet_seconds=10.0, settle_seconds=0.5), journal, started_at=T0 - 60)
    job = receive(journal, "1.2.3.4", 5, T0, declared=None)
    assert assembler.complete_due(now=T0 + 9.99) == []
    assert assembler.complete_due(now=T0 + 10.0) == [job]
    done = journal.job(job)
    assert done.state is JobState.COMPLETE and done.completion == "quiet" and done.completed_at == T0 + 10.0


def test_declared_size_completes_after_the_settle_time(tmp_path):
    journal = Journal(tmp_path / "j.sqlite")
    assembler = Assembler(SeriesConfig(quiet_seconds=30.0, settle_seconds=0.5), journal, started_at=T0 - 60)
    job = receive(journal, "1.2.3.4", 10, T0, declared=10)
    assert assembler.complete_due(now=T0 + 0.49) == []
    assert assembler.complete_due(now=T0 + 0.5) == [job]
    assert journal.job(job).completion == "declared"


def test_a_partial_declared_series_waits_for_the_quiet_period(tmp_path):
    journal = Journal(tmp_path / "j.sqlite")
    assembler = Assembler(SeriesConfig(quiet_seconds=2.0, settle_seconds=0.5), journal, started_at=T0 - 60)
    job = receive(journal, "1.2.3.4", 7, T0, declared=10)
    assert assembler.complete_due(now=T0 + 1.99) == []
    assert assembler.complete_due(now=T0 + 2.0) == [job] and journal.job(job).completion == "quiet"


def test_each_new_instance_restarts_the_quiet_period(tmp_path):
    journal = Journal(tmp_path / "j.sqlite")
    assembler = Assembler(SeriesConfig(quiet_seconds=2.0, settle_seconds=0.5), journal, started_at=T0 - 60)
    job = receive(journal, "1.2.3.4", 3, T0, declared=None)
    receive(journal, "1.2.3.4", 1, T0 + 1.5, declared=None, first=3)
    assert assembler.complete_due(now=T0 + 3.4) == []
    assert assembler.complete_due(now=T0 + 3.5) == [job]


def test_time_the_node_was_down_does_not_count_as_quiet(tmp_path):
    """A crash mid-series, then a restart 60 s later (longer than quiet_seconds): the partial series
    gets a full quiet period from the restart for the sender to resume."""
    journal = Journal(tmp_path / "j.sqlite")
    job = receive(journal, "1.2.3.4", 5, T0, declared=10)  # 5 of 10, then the node died
    restarted = T0 + 60.0
    assembler = Assembler(SeriesConfig(quiet_seconds=10.0, settle_seconds=0.5), journal, started_at=restarted)
    assert assembler.complete_due(now=restarted + 1.0) == []
    receive(journal, "1.2.3.4", 5, restarted + 2.0, declared=10, first=5)  # the sender resumes
    assert assembler.complete_due(now=restarted + 2.5) == [job]
    assert journal.job(job).completion == "declared" and len(journal.instances("1.2.3.4")) == 10
