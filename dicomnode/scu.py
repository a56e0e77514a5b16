"""The sending side: C-ECHO and C-STORE as an SCU, proposing only the contexts the files need."""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from dicomnode import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from dicomnode.netinternals import keep_responses_for_sender, no_delay

log = logging.getLogger("dicomnode.scu")

WARNING_STATUSES = frozenset({0xB000, 0xB006, 0xB007})  # stored, with a warning: counts as stored
MAX_CONTEXTS = 128
NO_RESPONSE = "no response"


class AssociationFailed(ConnectionError):
    """The peer could not be reached or rejected the association."""


@dataclass
class StoreReport:
    stored: int = 0
    warnings: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)

    @property
    def ok(self) -> bool:
        return not self.failed


def client_tls_context(ca_file: str | Path | None = None, cert_file: str | Path | None = None,
                       key_file: str | Path | None = None) -> ssl.SSLContext:
    """TLS for an SCU: the peer's certificate is verified against `ca_file` (the system's CAs when
    None); `cert_file`/`key_file` present a client certificate to a peer that requires one."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file) if ca_file else None)
    ctx.check_hostname = False  # DICOM peers are addressed by IP; trust comes from the CA
    if cert_file is not None:
        ctx.load_cert_chain(certfile=str(cert_file), keyfile=str(key_file) if key_file else None)
    return ctx


@dataclass(frozen=True)
class Timeouts:
    """Seconds to wait: for the TCP connection (`connect`), the A-ASSOCIATE-AC or A-RELEASE-RP
    (`acse`), each DIMSE response (`dimse`), and any PDU at all (`network`)."""

    connect: float = 5.0
    acse: float = 10.0
    dimse: float = 30.0
    network: float = 60.0

    @classmethod
    def of(cls, timeout: "float | Timeouts") -> "Timeouts":
        """A Timeouts as it is, or one number for all four."""
        return timeout if isinstance(timeout, Timeouts) else cls(timeout, timeout, timeout, timeout)


def _ae(calling_aet: str, timeout: "float | Timeouts") -> AE:
    t = Timeouts.of(timeout)
    ae = AE(ae_title=calling_aet)
    ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    ae.connection_timeout, ae.acse_timeout, ae.dimse_timeout, ae.network_timeout = t.connect, t.acse, t.dimse, t.network
    return ae


def _associate(ae: AE, host: str, port: int, called_aet: str, tls: ssl.SSLContext | None):
    """An established association on which only the sending thread reads responses, or
    AssociationFailed saying why not."""
    assoc = ae.associate(host, port, ae_title=called_aet, **_tls_args(tls))
    if not assoc.is_established:
        raise AssociationFailed(_why_not(assoc, host, port, called_aet))
    keep_responses_for_sender(assoc)
    no_delay(assoc)
    return assoc


def _tls_args(tls: ssl.SSLContext | None) -> dict:
    return {"tls_args": (tls, None)} if tls is not None else {}


def echo(host: str, port: int, called_aet: str, calling_aet: str = "DICOMNODE", timeout: float | Timeouts = 10.0,
         tls: ssl.SSLContext | None = None) -> int:
    """C-ECHO the peer; return the DIMSE status (0 on success). Raise AssociationFailed."""
    ae = _ae(calling_aet, timeout)
    ae.add_requested_context(Verification)
    assoc = _associate(ae, host, port, called_aet, tls)
    try:
        status = assoc.send_c_echo()
        if not status:
            raise AssociationFailed(f"no C-ECHO response from {called_aet}@{host}:{port}")
        return int(status.Status)
    finally:
        assoc.release()


def collect_files(paths: Iterable[str | Path]) -> list[Path]:
    """Expand files and folders (recursively) into a sorted list of candidate files."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"no such file or folder: {p}")
    return out


def _context_of(path: Path) -> tuple[str, str]:
    ds = dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
    return str(ds.file_meta.MediaStorageSOPClassUID), str(ds.file_meta.TransferSyntaxUID)


def store_files(paths: Sequence[Path], host: str, port: int, called_aet: str, calling_aet: str = "DICOMNODE",
                timeout: float | Timeouts = 60.0, tls: ssl.SSLContext | None = None,
                on_progress: Callable[[Path, bool], None] | None = None) -> StoreReport:
    """C-STORE each file as it is on disk (no re-encoding); warnings count as stored.

    `on_progress(path, stored)` is called after each file's response (or failure), before the
    next file is sent: a caller that records the stored ones knows, if the association is lost
    later, exactly which files the peer has. Files that are not DICOM are reported as failed,
    not sent. Raises AssociationFailed when no association can be made or it is lost, so a
    caller can retry later.
    """
    report = StoreReport()
    contexts: dict[tuple[str, str], list[Path]] = {}
    for path in paths:
        try:
            contexts.setdefault(_context_of(path), []).append(path)
        except (InvalidDicomError, AttributeError, OSError) as exc:
            report.failed.append((str(path), f"not a DICOM Part 10 file: {exc}"))
    keys = list(contexts)
    for start in range(0, len(keys), MAX_CONTEXTS):
        batch = keys[start:start + MAX_CONTEXTS]
        ae = _ae(calling_aet, timeout)
        for sop_class, ts in batch:
            ae.add_requested_context(sop_class, ts)
        assoc = _associate(ae, host, port, called_aet, tls)
        lost = False
        try:
            for key in batch:
                for path in contexts[key]:
                    stored = _store_one(assoc, path, report)
                    if on_progress:
                        on_progress(path, stored)
                    # No response at all: the connection closed, or the DIMSE timeout passed. This
                    # association is finished either way (pynetdicom may not say so yet), and a
                    # next request on it would only wait out the timeout again.
                    lost = not assoc.is_established or report.failed[-1:] == [(str(path), NO_RESPONSE)]
                    if lost:
                        raise AssociationFailed(f"association with {called_aet}@{host}:{port} was lost")
        finally:
            if assoc.is_established:
                assoc.abort() if lost else assoc.release()
    return report


def _store_one(assoc, path: Path, report: StoreReport) -> bool:
    """C-STORE one file; True when the peer stored it."""
    try:
        status = assoc.send_c_store(path)
    except (ValueError, RuntimeError) as exc:  # e.g. no accepted context for this file
        report.failed.append((str(path), str(exc)))
        return False
    code = int(status.Status) if status and "Status" in status else None
    if code == 0:
        report.stored += 1
        return True
    if code in WARNING_STATUSES:
        report.stored += 1
        report.warnings += 1
        return True
    report.failed.append((str(path), NO_RESPONSE if code is None else f"status 0x{code:04X}"))
    return False


def _why_not(assoc, host: str, port: int, called_aet: str) -> str:
    peer = f"{called_aet}@{host}:{port}"
    if assoc.is_rejected:
        rj = assoc.acceptor.primitive
        if rj is not None and getattr(rj, "result", None) in (1, 2):
            return f"association rejected by {peer}: {rj.reason_str} ({rj.result_str}, source: {rj.source_str})"
        return f"association rejected by {peer}"
    # pynetdicom reports a refused connection as an abort: say both
    return f"cannot associate with {peer} (connection refused, aborted or timed out)"
