"""Node commands: serve, echo, send, rules test, queue, status (registered on the typer app)."""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import List, Optional

import typer

CONFIG_OPT = typer.Option(Path("/etc/dicomnode/node.toml"), "--config", "-c", help="The node's TOML config file.")
# Options shared by the SCU commands (echo, send)
AEC_OPT = typer.Option("DICOMNODE", "--aec", help="Called AE title.")
AET_OPT = typer.Option("DICOMNODE-SCU", "--aet", help="Calling AE title.")
TLS_CA_OPT = typer.Option(None, "--tls-ca", help="Use TLS, trusting this CA file.")

rules_app = typer.Typer(help="Dry-run the selection rules.", no_args_is_help=True)
queue_app = typer.Typer(help="Inspect and re-drive jobs in the journal.", no_args_is_help=True)


def _config(path: Path):
    from .config import ConfigError, load_config

    try:
        return load_config(path)
    except ConfigError as exc:
        typer.echo(f"config error: {exc}", err=True)
        raise typer.Exit(2)


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)


def _load_processor(cfg):
    """The synthesiser named by [inference]; None when model = "none" (receive/select/dispatch only)."""
    if cfg.inference.model == "none":
        return None
    try:
        from .engine.synthesizer import load_synthesizer
    except ImportError as exc:
        raise RuntimeError("the inference engine is not part of this build yet; set [inference] model = \"none\" "
                           f"to run the node without synthesis ({exc})") from None
    return load_synthesizer(cfg.inference)


def serve(config: Path = CONFIG_OPT) -> None:
    """Run the node: receive, assemble, select, synthesise and dispatch until stopped (SIGTERM/SIGINT)."""
    from .node import Node

    cfg = _config(config)
    _setup_logging(cfg.logging.level)
    log = logging.getLogger("dicomnode")
    try:
        processor = _load_processor(cfg)
    except Exception as exc:
        log.error("cannot load the model: %s", exc)
        raise typer.Exit(3)
    node = Node(cfg, processor)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        node.start()
    except OSError as exc:
        log.error("cannot start: %s", exc)
        raise typer.Exit(1)
    log.info("dicomnode serving (config %s)", cfg.source)
    stop.wait()
    log.info("stopping")
    node.stop()


def echo(
    host: str = typer.Argument("127.0.0.1"),
    port: int = typer.Argument(11112),
    aec: str = AEC_OPT,
    aet: str = AET_OPT,
    timeout: float = typer.Option(10.0, "--timeout"),
    tls_ca: Optional[Path] = TLS_CA_OPT,
) -> None:
    """C-ECHO a DICOM peer (exit 0 on success)."""
    from .net.scu import AssociationFailed, client_tls_context
    from .net.scu import echo as do_echo

    try:
        status = do_echo(host, port, aec, aet, timeout, tls=client_tls_context(tls_ca) if tls_ca else None)
    except (AssociationFailed, OSError) as exc:
        typer.echo(f"C-ECHO failed: {exc}", err=True)
        raise typer.Exit(1)
    typer.echo(f"C-ECHO {aec}@{host}:{port}: status 0x{status:04X}")
    raise typer.Exit(0 if status == 0 else 1)


def send(
    paths: List[Path] = typer.Argument(..., help="Files or folders (searched recursively)."),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(11112, "--port"),
    aec: str = AEC_OPT,
    aet: str = AET_OPT,
    timeout: float = typer.Option(60.0, "--timeout"),
    tls_ca: Optional[Path] = TLS_CA_OPT,
) -> None:
    """C-STORE files or folders to a DICOM peer, with a progress bar."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from .net.scu import AssociationFailed, client_tls_context, collect_files, store_files

    try:
        files = collect_files(paths)
    except FileNotFoundError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2)
    with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn(), transient=True) as bar:
        task = bar.add_task("sending", total=len(files))
        try:
            report = store_files(files, host, port, aec, aet, timeout,
                                 tls=client_tls_context(tls_ca) if tls_ca else None,
                                 on_progress=lambda *_: bar.advance(task))
        except (AssociationFailed, OSError) as exc:
            typer.echo(f"send failed: {exc}", err=True)
            raise typer.Exit(1)
    typer.echo(f"stored {report.stored} of {len(files)} ({report.warnings} with warnings)")
    for path, why in report.failed:
        typer.echo(f"  failed: {path}: {why}", err=True)
    raise typer.Exit(0 if report.ok else 1)


@rules_app.command("test")
def rules_test(
    paths: List[Path] = typer.Argument(..., help="Files or folders (searched recursively)."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Use this config's [rules] (default: built-in)."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list, one object per series."),
) -> None:
    """Dry-run the selection rules on files: per series, matched or not, which rule and why."""
    from .config import RulesConfig
    from .net.scu import collect_files
    from .rules import evaluate_paths

    rules = _config(config).rules if config else RulesConfig()
    try:
        files = collect_files(paths)
    except FileNotFoundError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2)
    decisions = evaluate_paths(rules, files)
    if as_json:
        typer.echo(json.dumps([d.as_dict() for d in decisions], indent=2))
        return
    for d in decisions:
        mark = "MATCH " if d.matched else "REJECT"
        typer.echo(f"{mark} {d.series_instance_uid or '-'} [{d.slices} slices] {d.description!r}\n       {d.reason}")


def _journal(config: Path):
    from .journal import Journal

    cfg = _config(config)
    if not cfg.journal_path.exists():
        typer.echo(f"no journal at {cfg.journal_path} (has the node run with this config?)", err=True)
        raise typer.Exit(2)
    return cfg, Journal(cfg.journal_path)


@queue_app.command("list")
def queue_list(
    config: Path = CONFIG_OPT,
    state: Optional[List[str]] = typer.Option(None, "--state", help="Only jobs in this state (repeatable)."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """List jobs with their state, reason and per-destination delivery state."""
    _, journal = _journal(config)
    jobs = journal.jobs(state or None)
    rows = []
    for job in jobs:
        deliveries = {d.destination: {"state": d.state, "attempts": d.attempts, "last_error": d.last_error}
                      for d in journal.deliveries(job.id)}
        rows.append({"id": job.id, "state": job.state, "series_instance_uid": job.series_uid,
                     "generation": job.generation, "updated": _iso(job.updated_at), "reason": job.reason,
                     "error": job.error, "outputs": job.outputs, "timings": job.timings, "deliveries": deliveries})
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        dl = ", ".join(f"{k}={v['state']}({v['attempts']})" for k, v in r["deliveries"].items())
        typer.echo(f"{r['id']:>6} {r['state']:<11} {r['updated']} {r['series_instance_uid']}"
                   f"{'  ' + dl if dl else ''}")
        if r["error"] or r["reason"]:
            typer.echo(f"       {r['error'] or r['reason']}")


@queue_app.command("retry")
def queue_retry(
    job_ids: Optional[List[int]] = typer.Argument(None, help="Jobs to retry."),
    config: Path = CONFIG_OPT,
    all_dead: bool = typer.Option(False, "--all-dead", help="Retry every dead-letter job."),
    all_failed: bool = typer.Option(False, "--all-failed", help="Re-process every failed job."),
) -> None:
    """Re-drive jobs: dead-letter deliveries are queued again, failed jobs are processed again."""
    from .journal import TransitionError

    _, journal = _journal(config)
    ids = list(job_ids or [])
    if all_dead:
        ids += [j.id for j in journal.jobs(["dead_letter"])]
    if all_failed:
        ids += [j.id for j in journal.jobs(["failed"])]
    if not ids:
        typer.echo("nothing to retry (name job ids, or use --all-dead / --all-failed)", err=True)
        raise typer.Exit(2)
    code = 0
    for job_id in ids:
        try:
            typer.echo(f"job {job_id}: {journal.retry(job_id)}")
        except TransitionError as exc:
            typer.echo(f"job {job_id}: {exc}", err=True)
            code = 1
    raise typer.Exit(code)


@queue_app.command("purge")
def queue_purge(
    job_ids: Optional[List[int]] = typer.Argument(None, help="Jobs to remove."),
    config: Path = CONFIG_OPT,
    state: Optional[List[str]] = typer.Option(None, "--state", help="Remove all jobs in this state."),
    force: bool = typer.Option(False, "--force", help="Also remove jobs whose results are undelivered."),
) -> None:
    """Remove jobs (and their output files) from the journal."""
    from .journal import ACTIVE_STATES
    from .retention import remove_job_files
    from .spool import Spool

    cfg, journal = _journal(config)
    spool = Spool(cfg.node.storage_dir)
    jobs = [journal.job(i) for i in job_ids or []] + (journal.jobs(state) if state else [])
    removed = 0
    for job in filter(None, jobs):
        if (job.state in ACTIVE_STATES or job.state == "dead_letter") and not force:
            typer.echo(f"job {job.id} is {job.state}: not purged (use --force)", err=True)
            continue
        journal.purge_job(job.id)
        remove_job_files(journal, spool, job)  # received files go too, unless the series is still active
        removed += 1
    typer.echo(f"purged {removed} job(s)")


def status(
    config: Path = CONFIG_OPT,
    ping: bool = typer.Option(True, "--ping/--no-ping", help="Also C-ECHO the running node."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Summarise the node: jobs by state, deliveries, spool free space, and whether it answers C-ECHO."""
    from .net.scu import AssociationFailed, echo as do_echo
    from .spool import Spool

    cfg, journal = _journal(config)
    out = {"ae_title": cfg.node.ae_title, "address": f"{cfg.node.host}:{cfg.node.port}",
           "jobs": journal.state_counts(), "instances": journal.instance_count(),
           "deliveries_pending": len(journal.deliveries(states=("pending",))),
           "deliveries_dead_letter": len(journal.deliveries(states=("dead_letter",))),
           "spool_free_mb": round(Spool(cfg.node.storage_dir).free_mb())}
    if ping:
        try:
            out["echo"] = do_echo(cfg.node.host, cfg.node.port, cfg.node.ae_title, timeout=5) == 0
        except (AssociationFailed, OSError):
            out["echo"] = False
    if as_json:
        typer.echo(json.dumps(out, indent=2))
        return
    for key, value in out.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items() if v)
        typer.echo(f"{key:<24} {value}")


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t))


def register(app: typer.Typer) -> None:
    app.command()(serve)
    app.command()(echo)
    app.command()(send)
    app.command()(status)
    app.add_typer(rules_app, name="rules")
    app.add_typer(queue_app, name="queue")
