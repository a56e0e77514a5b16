import time

from dicomnode.config import RetentionConfig
from dicomnode.journal import Instance, Journal
from dicomnode.retention import sweep
from dicomnode.spool import Spool, write_atomic


def make_job(journal, spool, series, final_state, sop):
    path = spool.instance_path("1.2", series, sop)
    write_atomic(path, [b"x"])
    job_id, _ = journal.record_instance(Instance(sop, series, "1.2", "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.1.2.1",
                                                 str(path), 1, "SCU", time.time(), None, None, None))
    out = spool.output_dir(job_id)
    path_to = {"done": ["complete", "selected", "processing", "encoded", "sending", "done"],
               "sending": ["complete", "selected", "processing", "encoded", "sending"],
               "dead_letter": ["complete", "selected", "processing", "encoded", "sending", "dead_letter"],
               "ignored": ["complete", "ignored"]}[final_state]
    for state in path_to:
        if state == "encoded":  # the outputs are written, as the process stage writes them
            write_atomic(out / "o.dcm", [b"y"])
        journal.transition(job_id, state, **({"output_dir": str(out)} if state == "encoded" else {}))
    return job_id, path, out


def test_retention_removes_finished_series_but_never_undelivered_ones(tmp_path):
    journal, spool = Journal(tmp_path / "j.sqlite"), Spool(tmp_path / "spool")
    done = make_job(journal, spool, "1.2.1", "done", "1.2.1.1")
    ignored = make_job(journal, spool, "1.2.2", "ignored", "1.2.2.1")
    sending = make_job(journal, spool, "1.2.3", "sending", "1.2.3.1")
    dead = make_job(journal, spool, "1.2.4", "dead_letter", "1.2.4.1")
    cfg = RetentionConfig(keep_hours=1.0)
    assert sweep(cfg, journal, spool) == 0  # nothing is old enough yet
    assert sweep(cfg, journal, spool, now=time.time() + 7200) == 2
    for _, path, out in (done, ignored):
        assert not path.exists() and not out.exists()
    for _, path, out in (sending, dead):
        assert path.exists() and out.exists()
    assert journal.job(done[0]).purged_at is not None
    assert journal.instances("1.2.1") == [] and journal.instances("1.2.3")
    assert sweep(cfg, journal, spool, now=time.time() + 7200) == 0  # idempotent


def test_queue_purge_removes_the_received_files_too(tmp_path):
    from typer.testing import CliRunner

    from dicomnode.cli import app

    store = tmp_path / "store"
    journal, spool = Journal(store / "journal.sqlite"), Spool(store)
    job_id, path, out = make_job(journal, spool, "1.2.1", "done", "1.2.1.1")
    toml = tmp_path / "node.toml"
    toml.write_text(f'[node]\nstorage_dir = "{store}"\n')
    result = CliRunner().invoke(app, ["queue", "purge", "--config", str(toml), str(job_id)])
    assert result.exit_code == 0 and "purged 1" in result.output
    assert not path.exists() and not out.exists() and journal.instances("1.2.1") == []
