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

log = logging.getLogger("dicomnode.scu")

WARNING_STATUSES = frozenset({0xB000, 0xB006, 0xB007})  # stored, with a warning: counts as stored
MAX_CONTEXTS = 128


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


def _ae(calling_aet: str, timeout: float) -> AE:
    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    return ae


def _tls_args(tls: ssl.SSLContext | None) -> dict:
    return {"tls_args": (tls, None)} if tls is not None else {}


def echo(host: str, port: int, called_aet: str, calling_aet: str = "DICOMNODE", timeout: float = 10.0,
         tls: ssl.SSLContext | None = None) -> int:
    """C-ECHO the peer; return the DIMSE status (0 on success). Raise AssociationFailed."""
    ae = _ae(calling_aet, timeout)
    ae.add_requested_context(Verification)
    assoc = ae.associate(host, port, ae_title=called_aet, **_tls_args(tls))
    if not assoc.is_established:
        raise AssociationFailed(_why_not(assoc, host, port, called_aet))
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
                timeout: float = 60.0, tls: ssl.SSLContext | None = None,
                on_progress: Callable[[Path, int], None] | None = None) -> StoreReport:
    """C-STORE each file as it is on disk (no re-encoding); warnings count as stored.

    Files that are not DICOM are reported as failed, not sent. Raises AssociationFailed when
    no association can be made, so a caller can retry the whole batch later.
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
        assoc = ae.associate(host, port, ae_title=called_aet, **_tls_args(tls))
        if not assoc.is_established:
            raise AssociationFailed(_why_not(assoc, host, port, called_aet))
        try:
            for key in batch:
                for path in contexts[key]:
                    _store_one(assoc, path, report)
                    if on_progress:
                        on_progress(path, 0)
                    if not assoc.is_established:
                        raise AssociationFailed(f"association with {called_aet}@{host}:{port} was lost")
        finally:
            if assoc.is_established:
                assoc.release()
    return report


def _store_one(assoc, path: Path, report: StoreReport) -> None:
    try:
        status = assoc.send_c_store(path)
    except (ValueError, RuntimeError) as exc:  # e.g. no accepted context for this file
        report.failed.append((str(path), str(exc)))
        return
    code = int(status.Status) if status and "Status" in status else None
    if code == 0:
        report.stored += 1
    elif code in WARNING_STATUSES:
        report.stored += 1
        report.warnings += 1
    else:
        report.failed.append((str(path), "no response" if code is None else f"status 0x{code:04X}"))


def _why_not(assoc, host: str, port: int, called_aet: str) -> str:
    peer = f"{called_aet}@{host}:{port}"
    if assoc.is_rejected:
        rj = assoc.acceptor.primitive
        if rj is not None and getattr(rj, "result", None) in (1, 2):
            return f"association rejected by {peer}: {rj.reason_str} ({rj.result_str}, source: {rj.source_str})"
        return f"association rejected by {peer}"
    # pynetdicom reports a refused connection as an abort: say both
    return f"cannot associate with {peer} (connection refused, aborted or timed out)"
