"""Receive over DICOMweb: the STOW-RS service (PS3.18 10.5, Store Instances) on its own port.

`POST {path}/studies` or `{path}/studies/{StudyInstanceUID}` with a `multipart/related;
type="application/dicom"` body, one Part 10 instance per part. In order:

1. authentication before anything is read: a bearer token from `tokens_file` (read at every
   request, so a revoked token stops working at once) or, with TLS and a CA, the client
   certificate the handshake already checked (401 otherwise);
2. limits: at most `max_concurrent_requests` at once (503 with Retry-After), a declared
   Content-Length over `max_request_mb` is refused unread (413), a streamed body is counted as it
   comes and cut at the limit (413), a body that stalls `request_timeout` seconds gets 408;
3. the whole body is read and parsed first: a body that is not multipart/related, a part that is
   not application/dicom (415), or a multipart body that ends before its closing boundary (400)
   stores nothing;
4. each part is checked and stored as a C-STORE instance is (`StoreSCP.store_instance`: the same
   structure checks, fsync and journal commit), so the series is assembled, selected and
   processed as if it had come by C-STORE; the SOP class and transfer syntax must be ones the
   C-STORE SCP accepts (failure reasons 0x0122 and 0xC122);
5. the response, only after every stored instance is on disk and in the journal: a PS3.18 Store
   Instances Response (application/dicom+json) with a Referenced SOP Sequence item per stored
   instance and a Failed SOP Sequence item (with its Failure Reason) per refused one; HTTP 200
   when all were stored, 202 when some were, 409 when none.

Nothing of a failed request or part is kept: bodies live in memory only, and at most
`max_concurrent_requests` x `max_request_mb` of them at once.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING

import pydicom
from pydicom.uid import UID

from dicomnode.config import Config
from dicomnode.logs import printable
from dicomnode.receive import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_PROCESSING_FAILURE,
    STATUS_SUCCESS,
    scp_contexts,
    server_tls_context,
)
from dicomnode.spool import InvalidUID, check_uid
from dicomnode.wire import MalformedDataSet, split_part10

if TYPE_CHECKING:
    from aiohttp import web

    from dicomnode.receive import StoreSCP

log = logging.getLogger("dicomnode.stow")

DICOM_JSON = "application/dicom+json"
FAILURE_SOP_CLASS = 0x0122  # Referenced SOP Class not supported
FAILURE_TRANSFER_SYNTAX = 0xC122  # Referenced Transfer Syntax not supported
FAILURE_PROCESSING = 0x0110  # Processing failure (PS3.18 uses it for what C-STORE calls 0xC001)
CHUNK = 1 << 16


class RequestError(Exception):
    def __init__(self, status: int, reason: str, close: bool = False):
        super().__init__(reason)
        self.status, self.reason, self.close = status, reason, close


def load_tokens(path: Path) -> dict[str, str]:
    """token -> the caller's name, from lines `NAME TOKEN` or `TOKEN` ('#' starts a comment)."""
    tokens: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        words = line.split("#", 1)[0].split()
        if len(words) == 1:
            tokens[words[0]] = "dicomweb"
        elif len(words) >= 2:
            tokens[words[1]] = words[0][:32]
    return tokens


def _caller(request: "web.Request", tokens_file: Path | None) -> str | None:
    """The caller's name, or None when it is not authenticated."""
    if tokens_file is not None:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            return None
        given_b = given.strip().encode()
        name = None
        try:
            tokens = load_tokens(tokens_file)
        except (OSError, UnicodeDecodeError) as exc:  # nobody gets in until it can be read again
            log.error("[dicomweb] tokens_file cannot be read: %s", exc)
            return None
        for token, who in tokens.items():  # compare with every token: no early exit
            if hmac.compare_digest(token.encode(), given_b):
                name = who
        return name
    cert = request.transport.get_extra_info("peercert") if request.transport else None
    if not cert:
        return None
    subject = dict(x[0] for x in cert.get("subject", ()) if x)
    return str(subject.get("commonName", "client certificate"))[:32]


class StowService:
    """The STOW-RS service: an aiohttp server on its own thread and event loop; the storing
    itself runs on the loop's worker threads through `StoreSCP.store_instance`."""

    def __init__(self, cfg: Config, scp: "StoreSCP", metrics=None):
        self.cfg = cfg
        self.scp = scp
        self.metrics = metrics
        sops = scp_contexts()
        self._sop_classes = {sop for sop, _ in sops}
        self._syntaxes = set(sops[0][1])
        self._active = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: "web.AppRunner | None" = None
        self._port = cfg.dicomweb.port

    @property
    def port(self) -> int:
        return self._port

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        from aiohttp import web

        web_cfg = self.cfg.dicomweb
        app = web.Application()
        base = web_cfg.path
        app.router.add_post(f"{base}/studies", self._handle)
        app.router.add_post(f"{base}/studies/{{study}}", self._handle)
        ssl_context = server_tls_context(self.cfg.tls) if web_cfg.tls else None
        loop = asyncio.new_event_loop()
        ready, errors = threading.Event(), []

        async def open_site() -> None:
            self._runner = web.AppRunner(app, access_log=None, keepalive_timeout=15)
            await self._runner.setup()
            site = web.TCPSite(self._runner, web_cfg.host, web_cfg.port, ssl_context=ssl_context, backlog=128)
            await site.start()
            server = getattr(site, "_server", None)
            if server is not None and server.sockets:
                self._port = server.sockets[0].getsockname()[1]

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(open_site())
            except Exception as exc:  # e.g. the port is taken: serve says so
                errors.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            if self._runner is not None:
                loop.run_until_complete(self._runner.cleanup())
            loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=run, name="dicomnode-stow", daemon=True)
        self._thread.start()
        ready.wait(30)
        if errors:
            self.stop()
            raise errors[0] if isinstance(errors[0], OSError) else OSError(str(errors[0]))
        log.info("STOW-RS listening on %s://%s:%d%s/studies", "https" if ssl_context else "http", web_cfg.host,
                 self._port, base)

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            if self._thread.is_alive():
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(30)
            if not self._loop.is_closed() and not self._loop.is_running():
                self._loop.close()
        self._loop = self._thread = None

    @property
    def listening(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- the request --------------------------------------------------------------------------
    async def _handle(self, request: "web.Request") -> "web.StreamResponse":
        from aiohttp import web

        try:
            response = await self._stow(request)
        except RequestError as exc:
            log.warning("STOW-RS request from %s refused (HTTP %d): %s", request.remote, exc.status, exc.reason)
            headers = {"Retry-After": "5"} if exc.status == 503 else {}
            if exc.status == 401:
                headers["WWW-Authenticate"] = 'Bearer realm="dicomnode"'
            response = web.Response(status=exc.status, text=exc.reason + "\n", headers=headers)
            if exc.close:
                response.force_close()
        if self.metrics is not None:
            self.metrics.dicomweb_requests.labels(str(response.status)).inc()
        return response

    async def _stow(self, request: "web.Request") -> "web.Response":
        from aiohttp import web

        web_cfg = self.cfg.dicomweb
        caller = _caller(request, web_cfg.tokens_file)
        if caller is None:
            raise RequestError(401, "authentication required", close=True)
        if self._active >= web_cfg.max_concurrent_requests:
            raise RequestError(503, f"busy: {self._active} requests in progress", close=True)
        self._active += 1
        try:
            study = request.match_info.get("study")
            if study is not None:
                try:
                    study = check_uid(study, "Study Instance UID in the URL")
                except InvalidUID as exc:
                    raise RequestError(400, str(exc), close=True) from None
            parts = await self._read_parts(request)
            loop = asyncio.get_running_loop()
            body, status = await loop.run_in_executor(None, self._store_parts, parts, study, caller)
        finally:
            self._active -= 1
        return web.Response(status=status, body=body, content_type=DICOM_JSON)

    async def _read_parts(self, request: "web.Request") -> list[bytes]:
        web_cfg = self.cfg.dicomweb
        limit = web_cfg.max_request_mb << 20
        if request.content_length is not None and request.content_length > limit:
            raise RequestError(413, f"request of {request.content_length} bytes is over the {web_cfg.max_request_mb} MB "
                               "limit", close=True)
        ctype = request.headers.get("Content-Type", "")
        main, params = _media_type(ctype)
        if main != "multipart/related" or params.get("type", "application/dicom").lower() != "application/dicom":
            raise RequestError(415, 'expected multipart/related; type="application/dicom"', close=True)
        if not params.get("boundary"):
            raise RequestError(400, "multipart body without a boundary", close=True)
        from aiohttp import BodyPartReader

        total, parts = 0, list[bytes]()
        try:
            reader = _reader(request)
            while True:
                part = await asyncio.wait_for(reader.next(), web_cfg.request_timeout)
                if part is None:
                    break
                if not isinstance(part, BodyPartReader) or \
                        _media_type(part.headers.get("Content-Type", ""))[0] != "application/dicom":
                    raise RequestError(415, f"part {len(parts) + 1} is not application/dicom", close=True)
                data = bytearray()
                while True:
                    chunk = await asyncio.wait_for(part.read_chunk(CHUNK), web_cfg.request_timeout)
                    if not chunk:
                        break
                    total += len(chunk)
                    if total > limit:
                        raise RequestError(413, f"request over the {web_cfg.max_request_mb} MB limit", close=True)
                    data += chunk
                parts.append(bytes(data))
        except asyncio.TimeoutError:
            raise RequestError(408, f"request body stalled for {web_cfg.request_timeout:g} s", close=True) from None
        except RequestError:
            raise
        except Exception as exc:  # a malformed or truncated multipart body: nothing of it is stored
            raise RequestError(400, f"malformed multipart body: {printable(exc)}", close=True) from None
        if not reader.at_eof():
            raise RequestError(400, "multipart body ends before its closing boundary", close=True)
        if not parts:
            raise RequestError(400, "no instance in the request", close=True)
        return parts

    def _store_parts(self, parts: list[bytes], study: str | None, caller: str) -> tuple[bytes, int]:
        via = f"STOW-RS ({caller})"
        stored, failed = [], []
        for data in parts:
            sop_class, sop_uid, status = self._store_part(data, study, caller, via)
            item = pydicom.Dataset()
            item.ReferencedSOPClassUID = sop_class or None
            item.ReferencedSOPInstanceUID = sop_uid or None
            if status == STATUS_SUCCESS:
                stored.append(item)
            else:
                item.FailureReason = FAILURE_PROCESSING if status == STATUS_PROCESSING_FAILURE else status
                failed.append(item)
        response = pydicom.Dataset()
        if stored:
            response.ReferencedSOPSequence = stored
        if failed:
            response.FailedSOPSequence = failed
        log.info("STOW-RS from %s: %d instances stored, %d refused", caller, len(stored), len(failed))
        body = json.dumps(response.to_json_dict()).encode()
        return body, 200 if not failed else (202 if stored else 409)

    def _store_part(self, data: bytes, study: str | None, caller: str, via: str) -> tuple[str, str, int]:
        """(SOP Class UID, SOP Instance UID, status) of one part."""
        try:
            meta, offset = split_part10(data)
            sop_class = check_uid(meta.get(0x0002), "Media Storage SOP Class UID")
            sop_uid = check_uid(meta.get(0x0003), "Media Storage SOP Instance UID")
            ts = UID(check_uid(meta.get(0x0010), "Transfer Syntax UID"))
        except (MalformedDataSet, InvalidUID) as exc:
            log.warning("%s part refused (0x%04X): %s", via, STATUS_CANNOT_UNDERSTAND, printable(exc))
            return "", "", STATUS_CANNOT_UNDERSTAND
        if sop_class not in self._sop_classes:
            log.warning("%s part refused (0x%04X): SOP class %s is not accepted", via, FAILURE_SOP_CLASS, sop_class)
            return sop_class, sop_uid, FAILURE_SOP_CLASS
        if str(ts) not in self._syntaxes:
            log.warning("%s part refused (0x%04X): transfer syntax %s is not accepted", via, FAILURE_TRANSFER_SYNTAX,
                        ts)
            return sop_class, sop_uid, FAILURE_TRANSFER_SYNTAX
        status = self.scp.store_instance(sop_class, sop_uid, ts, data[offset:],
                                         lambda: pydicom.dcmread(BytesIO(data)), caller, via, study=study)
        return sop_class, sop_uid, status


def _media_type(value: str) -> tuple[str, dict[str, str]]:
    """('type/subtype' in lower case, parameters) of a Content-Type value."""
    from email.message import Message

    msg = Message()
    msg["Content-Type"] = value
    params = {k.lower(): v for k, v in (msg.get_params() or [])[1:]} if value else {}
    return msg.get_content_type().lower() if value else "", params


def _reader(request: "web.Request"):
    """aiohttp's multipart reader, taking boundaries up to 200 characters: RFC 2046 allows 70, but
    Orthanc's DICOMweb client (plugin 1.7) sends 73."""
    from aiohttp import MultipartReader

    class Reader(MultipartReader):
        def _get_boundary(self) -> str:
            boundary = self._mimetype.parameters["boundary"]
            if len(boundary) > 200:
                raise ValueError(f"boundary of {len(boundary)} characters (200 at most)")
            return boundary

    return Reader(request.headers, request.content)
