"""Node commands: serve, echo, send, rules test, queue, status (registered on the typer app)."""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from pathlib import Path
from typing import List, Optional

import typer

from dicomnode.journal import DeliveryState, JobState

CONFIG_OPT = typer.Option(Path("/etc/dicomnode/node.toml"), "--config", "-c", help="The node's TOML config file.")
# Options shared by the SCU commands (echo, send)
AEC_OPT = typer.Option("DICOMNODE", "--aec", help="Called AE title.")
AET_OPT = typer.Option("DICOMNODE-SCU", "--aet", help="Calling AE title.")
TLS_CA_OPT = typer.Option(None, "--tls-ca", help="Use TLS, trusting this CA file.")
TLS_CERT_OPT = typer.Option(None, "--tls-cert", help="Client certificate (PEM), for a peer that requires one.")
TLS_KEY_OPT = typer.Option(None, "--tls-key", help="The client certificate's private key (PEM).")

rules_app = typer.Typer(help="Dry-run the selection rules.", no_args_is_help=True)
queue_app = typer.Typer(help="Inspect and re-drive jobs in the journal.", no_args_is_help=True)
config_app = typer.Typer(help="Check a node configuration before starting the node.", no_args_is_help=True)


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print one line to stderr and return the Exit to raise: the CLI never shows a traceback
    for a user's mistake."""
    typer.echo(message, err=True)
    return typer.Exit(code)


def _config(path: Path):
    from dicomnode.config import ConfigError, load_config

    try:
        return load_config(path)
    except ConfigError as exc:
        raise fail(f"config error: {exc}", 2) from None


def _runtime_checks(cfg) -> list[str]:
    from dicomnode.config import ConfigError

    try:
        return cfg.check_runtime()
    except ConfigError as exc:
        raise fail(f"config error: {exc}", 2) from None


def _setup_logging(level: str) -> None:
    from dicomnode.logs import configure

    configure(level)  # what a stranger can provoke cannot flood the log, nor write long or many lines


def serve(config: Path = CONFIG_OPT) -> None:
    """Run the node: receive, assemble, select, synthesise and dispatch until stopped (SIGTERM/SIGINT)."""
    from .engine import Synthesis
    from .journal import JournalError
    from .node import ModelStartError, Node, StartError

    cfg = _config(config)
    _setup_logging(cfg.logging.level)
    log = logging.getLogger("dicomnode")
    for warning in _runtime_checks(cfg):
        log.warning("%s", warning)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    processor = (Synthesis(cfg.inference, cfg.output.uncertainty, cfg.safety) if cfg.inference.model != "none"
                 else None)
    try:
        node = Node(cfg, processor)
        node.start()
    except ModelStartError as exc:
        log.error("cannot load the model: %s", exc)
        raise typer.Exit(3) from None
    except StartError as exc:
        log.error("cannot start: %s", exc)
        raise typer.Exit(1) from None
    except JournalError as exc:
        log.error("cannot start: %s", exc)
        raise typer.Exit(1) from None
    except OSError as exc:
        log.error("cannot start: [node].storage_dir %s: %s", cfg.node.storage_dir, exc)
        raise typer.Exit(1) from None
    log.info("dicomnode serving (config %s)", cfg.source)
    # A timed wait, not stop.wait(): the kernel may deliver SIGTERM to any of the node's threads;
    # the Python handler then runs only when the main thread wakes, which a bare wait never does.
    while not stop.wait(timeout=1.0):
        pass
    log.info("stopping")
    node.stop()


def echo(
    host: str = typer.Argument("127.0.0.1"),
    port: int = typer.Argument(11112),
    aec: str = AEC_OPT,
    aet: str = AET_OPT,
    timeout: float = typer.Option(10.0, "--timeout"),
    tls_ca: Optional[Path] = TLS_CA_OPT,
    tls_cert: Optional[Path] = TLS_CERT_OPT,
    tls_key: Optional[Path] = TLS_KEY_OPT,
) -> None:
    """C-ECHO a DICOM peer (exit 0 on success)."""
    from dicomnode.scu import AssociationFailed
    from dicomnode.scu import echo as do_echo

    tls = _client_tls(tls_ca is not None or tls_cert is not None, tls_ca, tls_cert, tls_key)
    try:
        status = do_echo(host, port, aec, aet, timeout, tls=tls)
    except (AssociationFailed, OSError) as exc:
        typer.echo(f"C-ECHO failed: {exc}", err=True)
        raise typer.Exit(1) from None
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

    from dicomnode.scu import AssociationFailed, client_tls_context, store_files

    files = _files_or_exit(paths)
    with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn(), transient=True) as bar:
        task = bar.add_task("sending", total=len(files))
        try:
            report = store_files(files, host, port, aec, aet, timeout,
                                 tls=client_tls_context(tls_ca) if tls_ca else None,
                                 on_progress=lambda *_: bar.advance(task))
        except (AssociationFailed, OSError) as exc:
            typer.echo(f"send failed: {exc}", err=True)
            raise typer.Exit(1) from None
    if report.failed and all(why.startswith("not a DICOM") for _, why in report.failed) and not report.stored:
        raise fail(f"no DICOM Part 10 files among the {len(files)} file(s) in {', '.join(map(str, paths))}", 2)
    typer.echo(f"stored {report.stored} of {len(files)} ({report.warnings} with warnings)")
    for path, why in report.failed:
        typer.echo(f"  failed: {path}: {why}", err=True)
    raise typer.Exit(0 if report.ok else 1)


@rules_app.command("test")
def rules_test(
    paths: List[Path] = typer.Argument(..., help="Files or folders (searched recursively)."),
    config: Optional[Path] = typer.Option(None, "--config", "-c",
                                          help="Use this config's \\[rules] section (default: built-in rules)."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list, one object per series."),
    gate: bool = typer.Option(True, "--gate/--no-gate", help="Also score each matched series with the model's "
                              "input gate (\\[inference] model, \\[safety] input) and print the decision."),
) -> None:
    """Dry-run the selection rules on files: per series, matched or not, which rule and why; with the
    input gate's score and decision for each matched series."""
    from dicomnode.config import Config
    from dicomnode.rules import evaluate_paths, read_headers

    cfg = _config(config) if config else Config()
    files = _files_or_exit(paths)
    decisions = evaluate_paths(cfg.rules, files)
    if not any(d.series_instance_uid for d in decisions):
        reasons = "; ".join(d.reason for d in decisions[:3])
        raise fail(f"no DICOM series in {', '.join(map(str, paths))} ({len(files)} file(s) read: {reasons})", 2)
    gated: dict[str, dict] = {}
    if gate and cfg.inference.model != "none" and any(d.matched for d in decisions):
        from dicomnode.infer.model import ModelError
        from dicomnode.synthesize import gate_dry_run

        groups, _ = read_headers(files)
        matched = {d.series_instance_uid for d in decisions if d.matched}
        try:
            gated = gate_dry_run(cfg.inference, cfg.safety, {uid: [h.filename for h in groups[uid]] for uid in matched})
        except (ModelError, ValueError, RuntimeError) as exc:
            raise fail(f"cannot load the model for the input gate: {exc} (--no-gate skips it)", 3) from None
    if as_json:
        typer.echo(json.dumps([d.as_dict() | ({"gate": gated[d.series_instance_uid]}
                                              if d.series_instance_uid in gated else {}) for d in decisions], indent=2))
        return
    for d in decisions:
        mark = "MATCH " if d.matched else "REJECT"
        typer.echo(f"{mark} {d.series_instance_uid or '-'} [{d.slices} slices] {d.description!r}\n       {d.reason}")
        g = gated.get(d.series_instance_uid)
        if g is not None:
            score = "" if g["input_score"] is None else f"input score {g['input_score']:.2f}: "
            typer.echo(f"       gate: {score}{g['decision']}" + (f" ({g['reason']})" if g["reason"] else ""))


def _files_or_exit(paths: List[Path]) -> List[Path]:
    """The files under `paths`; a missing path or a search that finds no file ends the command."""
    from dicomnode.scu import collect_files

    try:
        files = collect_files(paths)
    except FileNotFoundError as exc:
        raise fail(str(exc), 2) from None
    if not files:
        raise fail(f"no files in {', '.join(map(str, paths))}", 2)
    return files


def _journal(config: Path):
    from dicomnode.journal import Journal

    cfg = _config(config)
    if not cfg.journal_path.exists():
        typer.echo(f"no journal at {cfg.journal_path} (has the node run with this config?)", err=True)
        raise typer.Exit(2)
    return cfg, Journal(cfg.journal_path, audit_file=cfg.logging.audit_file)


def _states(names: Optional[List[str]]) -> list[JobState]:
    """--state values as JobStates; exit 2 naming the states when one is unknown."""
    unknown = [s for s in names or [] if s not in JobState.__members__.values()]
    if unknown:
        raise fail(f"unknown state {unknown[0]!r}; the states are: {', '.join(JobState)}", 2)
    return [JobState(s) for s in names or []]


@queue_app.command("list")
def queue_list(
    config: Path = CONFIG_OPT,
    state: Optional[List[str]] = typer.Option(None, "--state", help="Only jobs in this state (repeatable)."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """List jobs with their state, reason and per-destination delivery state."""
    states = _states(state)
    _, journal = _journal(config)
    jobs = journal.jobs(states or None)
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
    if not rows:
        typer.echo("no jobs" + (f" in state {', '.join(state)}" if state else ""))
        return
    typer.echo(f"{'job':>6} {'state':<11} {'updated':<25} series / deliveries")
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
    """Re-drive jobs: dead-letter deliveries are queued again (each destination gets only the
    instances it has not acknowledged), failed jobs are processed again."""

    _, journal = _journal(config)
    ids = list(job_ids or [])
    if all_dead:
        ids += [j.id for j in journal.jobs([JobState.DEAD_LETTER])]
    if all_failed:
        ids += [j.id for j in journal.jobs([JobState.FAILED])]
    if not ids:
        typer.echo("nothing to retry (name job ids, or use --all-dead / --all-failed)", err=True)
        raise typer.Exit(2)
    _each_job(ids, journal.retry)


@queue_app.command("resend")
def queue_resend(
    job_ids: List[int] = typer.Argument(..., help="Jobs whose results are sent again."),
    config: Path = CONFIG_OPT,
    destination: Optional[List[str]] = typer.Option(None, "--destination", help="Only to this destination "
                                                    "(repeatable; default: every destination of the job)."),
) -> None:
    """Send every result instance of done (or dead-letter) jobs again, also those a destination
    has already acknowledged: the one way a destination receives an instance twice."""
    _, journal = _journal(config)
    _each_job(job_ids, lambda job_id: journal.resend(job_id, destination or None))


def _each_job(job_ids: List[int], action) -> None:
    """Apply `action` to each job, saying its new state or why not; exit 1 if any was refused."""
    from dicomnode.journal import TransitionError

    code = 0
    for job_id in job_ids:
        try:
            typer.echo(f"job {job_id}: {action(job_id)}")
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
    from dicomnode.retention import purge_refused, remove_job_files
    from dicomnode.spool import Spool

    states = _states(state)
    cfg, journal = _journal(config)
    spool = Spool(cfg.node.storage_dir)
    jobs = [journal.job(i) for i in job_ids or []] + (journal.jobs(states) if states else [])
    removed = 0
    for job in filter(None, jobs):
        refused = purge_refused(job, force)
        if refused:
            typer.echo(refused, err=True)
            continue
        journal.purge_job(job.id)
        remove_job_files(journal, spool, job)  # received files go too, unless the series is still active
        removed += 1
    typer.echo(f"purged {removed} job(s)")


def _client_tls(enabled: bool, ca: Path | None, cert: Path | None, key: Path | None):
    from dicomnode.scu import client_tls_context

    if not enabled:
        return None
    if (cert is None) != (key is None):
        raise fail("--tls-cert and --tls-key go together", 2)
    try:
        return client_tls_context(ca, cert, key)
    except (OSError, ValueError) as exc:
        raise fail(f"cannot use the TLS files: {exc}", 2) from None


def status(
    config: Path = CONFIG_OPT,
    ping: bool = typer.Option(True, "--ping/--no-ping", help="Also C-ECHO the running node."),
    as_json: bool = typer.Option(False, "--json"),
    aet: Optional[str] = typer.Option(None, "--aet", help="Calling AE title of the C-ECHO (default: the first "
                                      "of the node's allowed_calling_aets, else DICOMNODE-SCU)."),
    tls_ca: Optional[Path] = TLS_CA_OPT,
    tls_cert: Optional[Path] = TLS_CERT_OPT,
    tls_key: Optional[Path] = TLS_KEY_OPT,
) -> None:
    """Summarise the node: jobs by state, deliveries, spool free space, and whether it answers C-ECHO
    (over TLS when the node uses it; pass a client certificate if the node requires one)."""
    from dicomnode.scu import AssociationFailed
    from dicomnode.scu import echo as do_echo
    from dicomnode.spool import Spool

    cfg, journal = _journal(config)
    out = {"ae_title": cfg.node.ae_title, "address": f"{cfg.node.host}:{cfg.node.port}",
           "jobs": journal.state_counts(), "instances": journal.instance_count(),
           "deliveries_pending": len(journal.deliveries(states=(DeliveryState.PENDING,))),
           "deliveries_dead_letter": len(journal.deliveries(states=(DeliveryState.DEAD_LETTER,))),
           "spool_free_mb": round(Spool(cfg.node.storage_dir).free_mb())}
    if ping:
        calling = aet or (cfg.node.allowed_calling_aets[0] if cfg.node.allowed_calling_aets else "DICOMNODE-SCU")
        host = "127.0.0.1" if cfg.node.host in ("0.0.0.0", "::", "") else cfg.node.host
        tls = _client_tls(cfg.tls.enabled, tls_ca or cfg.tls.ca_file, tls_cert, tls_key)
        try:
            out["echo"] = do_echo(host, cfg.node.port, cfg.node.ae_title, calling, timeout=5, tls=tls) == 0
        except (AssociationFailed, OSError) as exc:
            out["echo"] = False
            out["echo_error"] = str(exc)
    if as_json:
        typer.echo(json.dumps(out, indent=2))
    else:
        for key, value in out.items():
            if isinstance(value, dict):
                value = ", ".join(f"{k}={v}" for k, v in value.items() if v)
            typer.echo(f"{key:<24} {value}")
    if ping and not out["echo"]:
        hint = ("; the node requires client certificates: pass --tls-cert and --tls-key"
                if cfg.tls.enabled and cfg.tls.ca_file and not tls_cert else "")
        raise fail(f"the node does not answer C-ECHO at {out['address']} as {cfg.node.ae_title}{hint}", 1)


def audit(
    config: Path = CONFIG_OPT,
    series: Optional[str] = typer.Option(None, "--series", help="Only this Series Instance UID (the source's)."),
    since: Optional[str] = typer.Option(None, "--since", help="Only events from this time on: ISO date/time "
                                        "(2026-12-01 or 2026-12-01T08:00) or hours ago (e.g. 24h)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per line."),
) -> None:
    """The audit trail from the journal: per series, each stage as it happened (received, complete,
    selected or ignored and why, processed, delivered or dead-lettered). No patient names or IDs."""
    from dicomnode.journal import parse_since

    cfg, journal = _journal(config)
    try:
        start = parse_since(since, time.time()) if since else None
    except ValueError as exc:
        raise fail(f"--since: {exc}", 2) from None
    rows = journal.audit(series, start)
    for row in rows:
        row["time"] = _iso(row.pop("at"))
        row.pop("timings")
        row.pop("outputs")
    if as_json:
        for row in rows:
            typer.echo(json.dumps(row))
        return
    if not rows:
        typer.echo("no events" + (f" for series {series}" if series else ""))
        return
    typer.echo(f"{'time':<25} {'job':>5}  {'event':<22} series / detail")
    for row in rows:
        typer.echo(f"{row['time']:<25} {row['job_id'] or '-':>5}  {row['kind']:<22} {row['series_uid'] or ''}")
        if row["detail"]:
            typer.echo(f"{'':<25} {'':>5}  {'':<22} {row['detail']}")


@config_app.command("check")
def config_check(config: Path = CONFIG_OPT) -> None:
    """Validate a config as `serve` would, without starting anything: keys and values, storage_dir,
    destinations' host names and the model (card and checksums). Exit 0 when the node could start."""
    cfg = _config(config)
    warnings = _runtime_checks(cfg)
    if cfg.inference.model != "none":
        from dicomnode.infer.model import ModelError, load_model
        from dicomnode.synthesize import DeviceError, pick_device, resolve_model

        try:
            device = pick_device(cfg.inference.device)
        except DeviceError as exc:
            raise fail(f"config error: {cfg.source}: [inference].device: {exc}", 2) from None
        try:
            model_dir = resolve_model(cfg.inference.model)
            version = load_model(model_dir, "cpu").version  # card, checksums and architecture
        except ModelError as exc:
            raise fail(f"config error: {cfg.source}: [inference].model: {exc}", 2) from None
        inf = cfg.inference
        model = f"{version} ({model_dir}) on {device}" if inf.backend == "local" else (
            f"{version} ({model_dir}) on {inf.ray_actors} Ray actor(s) at {inf.ray_address} "
            "(the cluster is not contacted by this check)")
    else:
        model = "none (receive, select and dispatch only)"
    for warning in warnings:
        typer.echo(f"warning: {warning}", err=True)
    node = cfg.node
    typer.echo(f"{cfg.source}: OK\n  listens as {node.ae_title} on {node.host}:{node.port}"
               f"{' (TLS)' if cfg.tls.enabled else ''}; storage {node.storage_dir}\n"
               f"  destinations: {', '.join(f'{d.name} ({d.address})' for d in cfg.destinations) or 'none'}\n"
               f"  metrics: {f'{cfg.metrics.host}:{cfg.metrics.port}' if cfg.metrics.enabled else 'off'}; model: {model}")


def _iso(t: float) -> str:
    """Local time with its UTC offset, to the second."""
    import datetime

    return datetime.datetime.fromtimestamp(t).astimezone().isoformat(timespec="seconds")


def register(app: typer.Typer) -> None:
    app.command()(serve)
    app.command()(echo)
    app.command()(send)
    app.command()(status)
    app.command()(audit)
    app.add_typer(rules_app, name="rules")
    app.add_typer(queue_app, name="queue")
    app.add_typer(config_app, name="config")
