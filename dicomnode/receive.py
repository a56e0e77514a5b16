"""The receiving side: a pynetdicom AE answering C-ECHO and C-STORE.

The C-STORE handler is deliberately thin: it validates the UIDs, writes the received bytes
durably to the spool, records the instance in the journal and returns. No pixel decoding,
no rules, no inference happen on the association thread.
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
import time
from typing import Any, Callable

import pydicom.config
from pydicom.uid import UID
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from dicomnode import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, logs
from dicomnode.config import Config, TLSConfig
from dicomnode.journal import Instance, Journal
from dicomnode.listener import MAX_UNREQUESTED, GuardedAssociationServer, start_server
from dicomnode.spool import InvalidUID, Spool, check_uid, part10_header, write_atomic
from dicomnode.wire import MalformedDataSet, check_encoded, check_image

log = logging.getLogger("dicomnode.scp")

LOG_VALUE_LIMIT = 120


def printable(value: object, limit: int = LOG_VALUE_LIMIT) -> str:
    """A value a stranger sent, fit for one log line: escaped, and cut at `limit` characters."""
    return logs.printable(value, limit)

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_MISMATCH = 0xA900  # the data set's SOP Class is not the one the request names
STATUS_CANNOT_UNDERSTAND = 0xC000  # bad or unsafe UIDs, a data set that does not parse to its end
STATUS_PROCESSING_FAILURE = 0xC001  # unexpected failure, logged with its reason


# (result source, diagnostic) of an A-ASSOCIATE-RJ -> what the log says (PS3.8 Table 9-21)
REJECT_REASONS = {
    (1, 1): "no reason given", (1, 2): "application context name not supported",
    (1, 3): "calling AE title not recognised", (1, 7): "called AE title not recognised",
    (2, 1): "no reason given", (2, 2): "protocol version not supported",
    (3, 1): "temporary congestion", (3, 2): "too many associations (local limit exceeded)",
}


def preferred_transfer_syntaxes() -> list[str]:
    """Every transfer syntax pynetdicom knows, in the order the SCP prefers them.

    pynetdicom accepts the first of *our* syntaxes that the caller proposes, so lossless
    encodings come first (a sender then keeps its compressed files as they are instead of
    transcoding them), uncompressed next, and lossy ones last: a lossless original is never
    turned lossy on the way in.
    """
    def rank(uid: str) -> int:
        u = UID(uid)
        if not u.is_compressed:
            return 1 if u.is_little_endian and not u.is_implicit_VR else (2 if u.is_little_endian else 3)
        name = u.name.lower()
        lossless = "lossy" not in name and ("lossless" in name or "rle" in name or "deflate" in name)
        return 0 if lossless else 4

    return sorted(ALL_TRANSFER_SYNTAXES, key=rank)


def server_tls_context(tls: TLSConfig) -> ssl.SSLContext:
    """TLS 1.2 or later with the node's certificate; with `ca_file`, clients must present a
    certificate signed by it. The C-STORE SCP and the STOW-RS service share it."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(certfile=str(tls.cert_file), keyfile=str(tls.key_file))
    if tls.ca_file:
        ctx.load_verify_locations(cafile=str(tls.ca_file))
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def scp_contexts() -> list[tuple[str, list[str]]]:
    """The SCP's presentation contexts: (abstract syntax, transfer syntaxes in preference order).
    The Conformance Statement (dicomnode.conformance) is generated from this table."""
    syntaxes = preferred_transfer_syntaxes()
    return [(str(Verification), syntaxes)] + [(str(cx.abstract_syntax), syntaxes)
                                              for cx in AllStoragePresentationContexts if cx.abstract_syntax]


# What each C-STORE status the SCP answers means (the Conformance Statement lists this table).
STORE_STATUSES = {
    STATUS_SUCCESS: "Success: written to disk (fsync) and committed to the journal",
    STATUS_OUT_OF_RESOURCES: "Refused, out of resources: free disk below `min_free_disk_mb`, or the file could "
                             "not be written",
    STATUS_DATASET_MISMATCH: "Error, data set does not match SOP class: the data set's SOP Class UID differs from "
                             "the request's",
    STATUS_CANNOT_UNDERSTAND: "Error, cannot understand: invalid or unsafe UIDs, a data set that does not parse to "
                              "its end, an image description that does not add up",
    STATUS_PROCESSING_FAILURE: "Error, processing failure: the journal could not record the instance",
}
LIMIT_REJECT = (0x02, 0x03, 0x02)  # A-ASSOCIATE-RJ result, source, reason: transient, presentation, local limit


def _int_or_none(value: object) -> int | None:
    try:
        return int(value) if isinstance(value, (int, float, str, bytes)) and value != "" else None
    except (TypeError, ValueError):
        return None


def _position_key(ds) -> str | None:
    ipp = ds.get("ImagePositionPatient")
    if not ipp or len(ipp) != 3:
        return None
    try:
        return "\\".join(f"{float(v):.2f}" for v in ipp)
    except (TypeError, ValueError):
        return None


class StoreSCP:
    """Owns the listening AE. It only writes the spool and the journal; the assembler finds new
    instances in the journal on its own tick (waking it per instance cost the receive path ~30 %
    of its GIL time under concurrent senders, bench/bench_receive.py)."""

    def __init__(self, cfg: Config, spool: Spool, journal: Journal, metrics=None):
        self.cfg = cfg
        self.spool = spool
        self.journal = journal
        self.metrics = metrics
        self._server: GuardedAssociationServer | None = None
        self._allowed_nets = [ipaddress.ip_network(h, strict=False) for h in cfg.node.allowed_hosts]
        self.ae = self._make_ae()

    def _make_ae(self) -> AE:
        node = self.cfg.node
        ae = AE(ae_title=node.ae_title)
        # pynetdicom counts connections still waiting for their request too (open, or closed and
        # being ended); the listener bounds those separately, and _on_requested enforces
        # max_associations on real requests.
        ae.maximum_associations = node.max_associations + 2 * MAX_UNREQUESTED + 8
        ae.acse_timeout = node.acse_timeout
        ae.dimse_timeout = node.dimse_timeout
        ae.network_timeout = node.network_timeout
        ae.maximum_pdu_size = node.max_pdu
        ae.require_called_aet = node.require_called_aet
        ae.require_calling_aet = list(node.allowed_calling_aets)
        ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        for sop_class, syntaxes in scp_contexts():
            ae.add_supported_context(sop_class, syntaxes)
        return ae

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        # pydicom checks every UID and value it decodes against its VR with a regex and warns
        # with the value: in a receiving process that is a sixth of the CPU per instance and
        # log lines a stranger writes. The node checks what it relies on itself (check_uid, wire).
        pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
        handlers = [
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_REJECTED, self._on_rejected),
        ]
        node = self.cfg.node
        self._server = start_server(self.ae, (node.host, node.port), evt_handlers=handlers,
                                    ssl_context=self._ssl_context(), allowed_networks=self._allowed_nets,
                                    request_timeout=node.request_timeout,
                                    max_pending_per_host=node.max_pending_per_host)
        log.info("listening as %s on %s:%s%s", node.ae_title, node.host, self.port,
                 " (TLS)" if self.cfg.tls.enabled else "")

    @property
    def port(self) -> int:
        return self._server.server_address[1] if self._server else self.cfg.node.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def _ssl_context(self) -> ssl.SSLContext | None:
        return server_tls_context(self.cfg.tls) if self.cfg.tls.enabled else None

    # -- handlers ---------------------------------------------------------------------------
    def _on_requested(self, event) -> None:
        """The A-ASSOCIATE-RQ has arrived: from now on ACSE waits `acse_timeout`. Enforce
        max_associations on requests (hosts outside the allowlist never get here: the listener
        closes their connection at accept)."""
        event.assoc.acse_timeout = self.cfg.node.acse_timeout
        if self._server is not None and self._server.requested() > self.cfg.node.max_associations:
            log.warning("rejecting association from %s: %d associations already", event.assoc.requestor.address,
                        self.cfg.node.max_associations)
            event.assoc.acse.send_reject(*LIMIT_REJECT)
            event.assoc.kill()
            return

    def _on_rejected(self, event) -> None:
        assoc = event.assoc
        rq, rj = assoc.requestor.primitive, assoc.acceptor.primitive
        why = REJECT_REASONS.get((rj.result_source, rj.diagnostic), "") if rj is not None else ""
        if why == "called AE title not recognised":
            who = f"called AE {str(rq.called_ae_title).strip()!r} (this node is {self.cfg.node.ae_title!r})"
        else:
            who = f"calling AE {str(rq.calling_ae_title).strip()!r}" if rq is not None else "caller"
        log.warning("association rejected (%s): %s from %s", why or "no reason given", who[:80],
                    assoc.requestor.address)
        if self.metrics:
            self.metrics.associations_rejected.inc()

    def _on_echo(self, event) -> int:
        return STATUS_SUCCESS

    def _on_store(self, event) -> int:
        started = time.perf_counter()
        status = self._store(event)
        if self.metrics:
            self.metrics.observe_store(status, time.perf_counter() - started)
        return status

    def _store(self, event) -> int:
        req = event.request
        calling = printable(event.assoc.requestor.ae_title)
        try:
            sop_uid = check_uid(req.AffectedSOPInstanceUID, "Affected SOP Instance UID")
            sop_class = check_uid(req.AffectedSOPClassUID, "Affected SOP Class UID")
            encoded = event.encoded_dataset(include_meta=False)
        except InvalidUID as exc:
            log.warning("C-STORE from %r refused (0x%04X): %s", calling, STATUS_CANNOT_UNDERSTAND, printable(exc))
            return STATUS_CANNOT_UNDERSTAND
        except Exception as exc:  # keep serving whatever the request held
            log.warning("C-STORE from %r refused (0x%04X): cannot read request: %s", calling,
                        STATUS_CANNOT_UNDERSTAND, printable(exc))
            return STATUS_CANNOT_UNDERSTAND
        return self.store_instance(sop_class, sop_uid, UID(event.context.transfer_syntax), encoded,
                                   lambda: event.dataset, calling, "C-STORE")

    def store_instance(self, sop_class: str, sop_uid: str, ts: UID, encoded: bytes, dataset: Callable[[], Any],
                       calling: str, via: str, study: str | None = None) -> int:
        """Check one received data set (`encoded`, without file meta, in transfer syntax `ts`;
        `dataset()` decodes it) and store it durably: the DIMSE status to answer. The C-STORE SCP
        and the STOW-RS service (dicomnode.webreceive) both store through here; `study`, when
        given, is the Study Instance UID the instance must have."""
        try:
            check_encoded(encoded, implicit_vr=ts.is_implicit_VR, little_endian=ts.is_little_endian,
                          deflated=ts.is_deflated)
            ds = dataset()
            check_image(ds, encapsulated=ts.is_encapsulated)
            for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
                if keyword in ds and ds[keyword].VR != "UI":
                    raise InvalidUID(f"{keyword} is encoded with VR {ds[keyword].VR}, not UI")
            study_uid = check_uid(ds.get("StudyInstanceUID"), "Study Instance UID")
            series_uid = check_uid(ds.get("SeriesInstanceUID"), "Series Instance UID")
            if check_uid(ds.get("SOPInstanceUID"), "SOP Instance UID in the data set") != sop_uid:
                raise InvalidUID(f"SOP Instance UID in the data set differs from the {via} request's")
            if study is not None and study_uid != study:
                log.warning("%s from %r refused (0x%04X): the instance is not of the study the request names",
                            via, calling, STATUS_DATASET_MISMATCH)
                return STATUS_DATASET_MISMATCH
            if str(ds.get("SOPClassUID", "")) != sop_class:
                log.warning("%s from %r refused (0x%04X): the data set's SOP Class UID %s is not the "
                            "request's %s", via, calling, STATUS_DATASET_MISMATCH,
                            printable(ds.get("SOPClassUID", "")), sop_class)
                return STATUS_DATASET_MISMATCH
            transfer_syntax = str(ts)
            images_in_acquisition = _int_or_none(ds.get("ImagesInAcquisition"))
            number_of_frames = _int_or_none(ds.get("NumberOfFrames"))
            position = _position_key(ds)
        except (InvalidUID, MalformedDataSet) as exc:
            log.warning("%s from %r refused (0x%04X): %s", via, calling, STATUS_CANNOT_UNDERSTAND, printable(exc))
            return STATUS_CANNOT_UNDERSTAND
        except Exception as exc:  # an undecodable header: tell the sender, keep serving
            log.warning("%s from %r refused (0x%04X): cannot read data set: %s", via, calling,
                        STATUS_CANNOT_UNDERSTAND, printable(exc))
            return STATUS_CANNOT_UNDERSTAND

        free = self.spool.free_mb()
        if free < self.cfg.node.min_free_disk_mb:
            log.error("%s refused (0xA700): %.0f MB free is under the %d MB watermark", via, free,
                      self.cfg.node.min_free_disk_mb)
            return STATUS_OUT_OF_RESOURCES
        path = self.spool.instance_path(study_uid, series_uid, sop_uid)
        # retention (or a `queue purge` in another process) cannot remove it between write and journal
        with self.journal.series_lock(series_uid), self.spool.storing():
            try:
                size = write_atomic(path, [part10_header(sop_class, sop_uid, transfer_syntax), encoded], uncache=True)
            except OSError as exc:
                log.error("%s refused (0xA700): cannot write instance to the spool: %s", via, exc)
                return STATUS_OUT_OF_RESOURCES
            try:
                self.journal.record_instance(
                    Instance(sop_instance_uid=sop_uid, series_uid=series_uid, study_uid=study_uid,
                             sop_class_uid=sop_class, transfer_syntax=transfer_syntax,
                             path=str(path), size=size, calling_aet=calling, received_at=time.time(),
                             images_in_acquisition=images_in_acquisition, number_of_frames=number_of_frames,
                             position=position),
                    late_policy=self.cfg.series.late_instance_policy,
                )
            except Exception as exc:
                log.error("%s refused (0x%04X): journal write failed: %s", via, STATUS_PROCESSING_FAILURE, exc)
                return STATUS_PROCESSING_FAILURE
        return STATUS_SUCCESS

