"""The DICOM Conformance Statement, laid out as PS3.2 asks and generated from the code's own
tables and defaults, so that it cannot drift from what the node does.

    dicomnode conformance [--out docs/reference/conformance.md]

Sources: the SCP's presentation contexts (`receive.scp_contexts`), its C-STORE statuses and
association limits (`receive`, `listener`, the `[node]` defaults), the SCU's warning statuses and
context limit (`scu`), the STOW-RS client (`stow`, the `[[destinations]]` defaults), the decoders
pydicom has for each transfer syntax, the created instance's constants (`encode`) and the node's
implementation identity. `tests/test_conformance.py` checks the page in docs/ equals this text,
and proposes every SOP class and transfer syntax it lists to a running node with DCMTK.
"""

from __future__ import annotations

from pydicom.uid import UID, ExplicitVRLittleEndian, SecondaryCaptureImageStorage

from dicomnode import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, __version__
from dicomnode.config import Config, DestinationConfig
from dicomnode.encode import (
    BANNER_TEXT,
    SERIES_DESCRIPTION,
    SERIES_NUMBER_OFFSET,
    UNCERTAINTY_DESCRIPTION,
    UNCERTAINTY_SERIES_OFFSET,
)
from dicomnode.listener import LISTEN_BACKLOG, MAX_UNREQUESTED
from dicomnode.receive import LIMIT_REJECT, STATUS_PROCESSING_FAILURE, STORE_STATUSES, scp_contexts
from dicomnode.scu import MAX_CONTEXTS, WARNING_STATUSES
from dicomnode.stow import UNAVAILABLE
from dicomnode.webreceive import FAILURE_PROCESSING, FAILURE_SOP_CLASS, FAILURE_TRANSFER_SYNTAX
from dicomnode.wire import BITS_ALLOCATED, MAX_INFLATED

VERIFICATION = "1.2.840.10008.1.1"


def _ts_kind(uid: str) -> str:
    u = UID(uid)
    if not u.is_compressed:
        return "uncompressed"
    name = u.name.lower()
    return "lossless" if "lossy" not in name and ("lossless" in name or "rle" in name or "deflate" in name) else "lossy"


def _decodable(uid: str) -> bool:
    from pydicom.pixels.decoders.base import get_decoder

    if not UID(uid).is_compressed:
        return True
    try:
        return bool(get_decoder(uid).is_available)
    except NotImplementedError:
        return False


def listed_contexts() -> tuple[list[str], list[str]]:
    """(SOP classes, transfer syntaxes) the statement lists as accepted by the SCP."""
    contexts = scp_contexts()
    return [sop for sop, _ in contexts], list(contexts[0][1])


def _table(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                      *("| " + " | ".join(r) + " |" for r in rows)])


def statement() -> str:
    cfg = Config()
    node, dispatch = cfg.node, cfg.dispatch
    dest = DestinationConfig(name="d", ae_title="X", host="127.0.0.1")
    sop_classes, syntaxes = listed_contexts()
    storage = [s for s in sop_classes if s != VERIFICATION]
    sc, elu = str(SecondaryCaptureImageStorage), str(ExplicitVRLittleEndian)
    ts_rows = [[UID(t).name, f"`{t}`", _ts_kind(t), "yes" if _decodable(t) else "no"] for t in syntaxes]
    sop_rows = [[UID(s).name, f"`{s}`"] for s in storage]
    rejects = [
        ["calling AE title not in `allowed_calling_aets` (when it is not empty)", "1 rejected-permanent",
         "1 service-user", "3 calling AE title not recognised"],
        ["called AE title is not `ae_title` (with `require_called_aet = true`)", "1 rejected-permanent",
         "1 service-user", "7 called AE title not recognised"],
        [f"more than `max_associations` ({node.max_associations}) associations that have sent their request",
         f"{LIMIT_REJECT[0]} rejected-transient", f"{LIMIT_REJECT[1]} service-provider (presentation)",
         f"{LIMIT_REJECT[2]} local limit exceeded"],
    ]
    statuses = [[f"0x{code:04X}", text] for code, text in STORE_STATUSES.items()]
    warnings = ", ".join(f"0x{c:04X}" for c in sorted(WARNING_STATUSES))
    unavailable = ", ".join(str(c) for c in sorted(UNAVAILABLE))
    web = cfg.dicomweb
    processed = ", ".join(UID(u).name for u in cfg.rules.sop_classes)
    stow_failures = [[f"0x{FAILURE_SOP_CLASS:04X}", "SOP class not accepted"],
                     [f"0x{FAILURE_TRANSFER_SYNTAX:04X}", "transfer syntax not accepted"],
                     *[[f"0x{FAILURE_PROCESSING if c == STATUS_PROCESSING_FAILURE else c:04X}", t]
                       for c, t in STORE_STATUSES.items() if c != 0]]
    iod_rows = [
        ["Series Instance UID, SOP Instance UID", "derived (`generate_uid`, pydicom's root) from the source UIDs, the "
         "model name and version, and a digest of the sampler settings: a re-send gives identical UIDs"],
        ["Series Number", f"source Series Number + {SERIES_NUMBER_OFFSET}"],
        ["Instance Number", "in spatial order along the slice normal"],
        ["Series Description", f"`{SERIES_DESCRIPTION}`"],
        ["Modality", "`OT`"],
        ["Synthetic Data (0008,001C)", "`YES`"],
        ["Image Type", "`DERIVED\\SECONDARY`"],
        ["Conversion Type", "`SYN`"],
        ["Burned In Annotation", f"`YES` with the `{BANNER_TEXT}` banner (the default), `NO` without"],
        ["Source Image Sequence", "the source slice, purpose of reference (121322, DCM, \"Source image for image "
         "processing operation\")"],
        ["Source Image Sequence: Referenced Frame Number", "the source frame, when the source is a multi-frame Enhanced "
         "MR or Legacy Converted Enhanced MR Image (one output image per frame)"],
        ["Referenced Series Sequence", "the source series and instance"],
        ["Derivation Description, Image Comments", "name the model and its version, and say the image is synthetic"],
        ["Contributing Equipment Sequence", "the MR scanner (109101), the synthesiser (109100, Manufacturer "
         "`dicomnode`) and highdicom (109102)"],
        ["Patient, Clinical Trial Subject, General Study and Patient Study attributes; Specific Character Set",
         "copied element by element from the source"],
        ["Frame of Reference, Image Position/Orientation (Patient), Pixel Spacing, Slice Thickness",
         "from the source"],
    ]
    parts = [f"""# DICOM Conformance Statement

dicomnode {__version__}. Generated by `dicomnode conformance` from the code's own tables and
defaults; `tests/test_conformance.py` checks that this page is that output, and proposes every SOP
class and transfer syntax listed here to a running node with DCMTK: what is listed is accepted, and
nothing else is.

## 1 Overview

dicomnode receives sagittal T2 fat-sat spine MR series, synthesises a PET/T2FS fusion image for
every slice with a deep-learning model, and sends the result to configured destinations as a
derived Secondary Capture series in the same study, marked synthetic. It is a research tool; its
images are not for diagnosis.

{_table(["SOP class or service", "user of service (SCU)", "provider of service (SCP)"], [
        [f"Storage SOP classes ({len(storage)}, [3.2.1](#321-sop-classes))", "Secondary Capture Image Storage "
         "(results); any (`dicomnode send`)", "yes"],
        ["Verification", "yes (`dicomnode echo`, `dicomnode status`)", "yes"],
        ["DICOMweb Store transaction (STOW-RS)", "yes (results to a DICOMweb destination)",
         "yes, with `[dicomweb] enabled = true`"],
    ])}

No media interchange.

## 2 Introduction

- **Audience**: the integration team that connects the node to a PACS, a scanner or a router.
- **Remarks**: this statement covers the daemon `dicomnode serve` and its command line.
  `python -m training retrieve` (a research tool run from a clone, not part of the daemon) is a
  Query/Retrieve SCU (Study Root C-FIND and C-GET) and is not covered here.
- **Terms**: AE application entity, SCP/SCU service class provider/user, PDU protocol data unit,
  TS transfer syntax, STOW-RS Store Over the Web (PS3.18).

## 3 Networking

### 3.1 Implementation model

#### 3.1.1 Application data flow

One application entity, `[node] ae_title` (default `{node.ae_title}`), does all DICOM
networking. A remote AE (PACS, scanner, router) sends a series with C-STORE; each instance is
written to disk and committed to the node's journal before the success status. When a series is
complete (declared size reached, or no new instance for `[series] quiet_seconds`) and the
selection rules accept it, the node synthesises the fusion images, encodes them, and sends them to
every destination: with C-STORE to a DICOM AE, or with STOW-RS to a DICOMweb service. With
`[dicomweb]` enabled, a DICOMweb client may store instances with STOW-RS instead of C-STORE.

#### 3.1.2 Functional definition of the AE

- **Storage SCP / Verification SCP**: listens on `[node] host`:`port` (default
  `{node.host}`:{node.port}), accepts associations, stores and journals instances, answers C-ECHO.
- **Storage SCU**: delivers results to each `[[destinations]]` entry, retrying with backoff until
  delivered or dead-lettered; `dicomnode send` sends files; `dicomnode echo` sends C-ECHO.
- **DICOMweb user agent**: the same delivery to destinations with a `url`, with STOW-RS.
- **STOW-RS origin server** (optional): receives instances over DICOMweb into the same spool and
  journal as the Storage SCP.

#### 3.1.3 Sequencing of real-world activities

Results are made only for a complete series that the selection rules accept; they are delivered
after they are encoded. Deliveries to different destinations, and of different jobs, are
independent.

### 3.2 AE specifications

#### 3.2.1 SOP classes

As SCP, every presentation context accepts each transfer syntax of [3.2.4](#324-transfer-syntaxes),
for Verification (`{VERIFICATION}`) and for each of these {len(storage)} storage SOP classes:

{_table(["SOP class", "UID"], sop_rows)}

Only series of {processed} are processed by default (`[rules] sop_classes`); the frames of an
Enhanced MR or Legacy Converted Enhanced MR Image are read as slices, from its shared and per-frame
functional groups. Instances of the other storage SOP classes are stored and journalled, and their
series end `ignored` with the reason. No extended negotiation, SCP/SCU role selection or asynchronous operations are supported.

As SCU: Secondary Capture Image Storage (`{sc}`) for the results, Verification, and with
`dicomnode send` the SOP class of each file sent.

#### 3.2.2 Association policies

- **Application context**: DICOM Application Context (1.2.840.10008.3.1.1.1).
- **Maximum PDU size** received: `[node] max_pdu`, default {node.max_pdu} (0 means unlimited).
- **Number of associations** accepted: `[node] max_associations` ({node.max_associations}) that
  have sent their A-ASSOCIATE-RQ; besides, at most `max_pending_per_host`
  ({node.max_pending_per_host}) connections of one host, and {MAX_UNREQUESTED} in all, may be waiting
  to send it. Listen backlog {LISTEN_BACKLOG}.
- **Number of associations** initiated: per destination at most `max_associations`
  ({dest.max_associations}) at once, one per delivery attempt.
- **Asynchronous operations**: not supported (one operation at a time on an association).
- **Implementation Class UID**: `{IMPLEMENTATION_CLASS_UID}`; **Implementation Version Name**:
  `{IMPLEMENTATION_VERSION_NAME}`.

#### 3.2.3 Association acceptance policy

- **Hosts**: a TCP connection from an address outside `[node] allowed_hosts` (when it is not
  empty) is closed when it is accepted.
- **Request deadline**: a new connection must send its A-ASSOCIATE-RQ (and, with TLS, complete the
  handshake) within `request_timeout` ({node.request_timeout:g} s), or it is closed.
- **Timeouts**: ACSE `acse_timeout` ({node.acse_timeout:g} s, from the request on), DIMSE
  `dimse_timeout` ({node.dimse_timeout:g} s), network `network_timeout` ({node.network_timeout:g} s).
- **Rejections** (A-ASSOCIATE-RJ):

{_table(["cause", "result", "source", "reason"], rejects)}

**C-STORE SCP.** Before answering, the SCP checks the request and the data set: the SOP Class and
SOP Instance UIDs of the request, and the Study, Series and SOP Instance UIDs of the data set, must
be valid UIDs (digits and dots, at most 64 characters) encoded with VR UI; the data set's SOP
Instance UID must equal the request's; the data set's element structure must parse to its last
byte (deflated data sets inflate to at most {MAX_INFLATED >> 30} GiB); the image pixel, image plane,
multi-frame, modality LUT and VOI LUT values must parse and be finite, Rows and Columns not 0,
Bits Allocated one of {", ".join(str(b) for b in sorted(BITS_ALLOCATED))}, Samples per Pixel 1 to
4, and native Pixel Data at least as long as its description. The data set is then written byte for
byte, in the transfer syntax it arrived in, with a Part 10 header, and committed to the journal. A
C-STORE of a SOP Instance UID already stored replaces the stored copy. Below `min_free_disk_mb`
({node.min_free_disk_mb} MB) free disk, C-STORE answers 0xA700 and the sender keeps its data.

{_table(["status", "meaning"], statuses)}

**C-ECHO SCP.** Answers 0x0000 to every C-ECHO on an accepted association.

#### 3.2.4 Transfer syntaxes

Every presentation context accepts every transfer syntax below. Of those a caller proposes, the
SCP chooses the first in this order, so a sender keeps its files as they are and nothing lossless
becomes lossy on the way in: lossless compressed first, then uncompressed, lossy last. "Decoded"
says whether the synthesiser can decode a series received in it (pydicom and its pylibjpeg,
openjpeg and RLE plugins); a series it cannot decode fails its job with the reason.

{_table(["transfer syntax", "UID", "kind", "decoded"], ts_rows)}

#### 3.2.5 Association initiation policy

**Delivery of results (C-STORE SCU).** For each DICOM destination: calling AE title
`[dispatch] calling_ae_title` (default: `[node] ae_title`), called AE title, host and port of the
destination. One presentation context per (SOP class, transfer syntax) of the files to send, at
most {MAX_CONTEXTS} per association; for the synthetic series, Secondary Capture Image Storage with
Explicit VR Little Endian (`{elu}`). Files are sent as stored; nothing is transcoded. Timeouts:
TCP connect {dest.connect_timeout:g} s, ACSE {dest.acse_timeout:g} s, DIMSE {dest.dimse_timeout:g} s,
network {dest.network_timeout:g} s (per destination). Status 0x0000 and the warnings {warnings} count
as stored; any other status fails the attempt. A C-STORE without a response aborts the
association. Each acknowledged instance is recorded before the next is sent; a retry (backoff from
{dispatch.backoff_initial_seconds:g} s, doubling up to {dispatch.backoff_max_seconds:g} s; dead letter
after {dispatch.give_up_after_seconds:g} s) sends only the instances not yet acknowledged.

**`dicomnode send`** proposes the SOP class and transfer syntax of each file as stored;
**`dicomnode echo`** proposes Verification with pynetdicom's default transfer syntaxes.

### 3.3 DICOMweb

**STOW-RS user agent.** For a destination with a `url`: `POST URL/studies` with
`multipart/related; type="application/dicom"`, at most `instances_per_request`
({dest.instances_per_request}) instances per request, each the stored file (no transcoding).
Authentication: none, HTTP basic, or a bearer token, read from `credentials_file` at each attempt;
server certificates verified against `ca_file` or the system's CAs. Connect timeout
{dest.connect_timeout:g} s, read timeout {dest.network_timeout:g} s. No redirects are followed and no
proxy is taken from the environment. The response's Referenced SOP Sequence (a Warning Reason
counts as stored) is recorded as delivered; instances in its Failed SOP Sequence or missing from it
are retried. HTTP {unavailable} and requests without an answer hold the destination with backoff;
any other error status fails the attempt.

**STOW-RS origin server.** With `[dicomweb] enabled = true`, on its own port (`[dicomweb] host`,
`port`, default `{web.host}`:{web.port}): `POST {web.path}/studies` and
`POST {web.path}/studies/{{StudyInstanceUID}}`, request body `multipart/related;
type="application/dicom"`, one Part 10 instance per part. No QIDO-RS, WADO-RS or other DICOMweb
service.

- Authentication before the body is read: a bearer token from `tokens_file` (read at every
  request), or, with `[dicomweb] tls = true` and a `[tls] ca_file`, a client certificate. HTTP 401
  otherwise.
- Limits: at most `max_concurrent_requests` ({web.max_concurrent_requests}) requests at once (HTTP
  503 with Retry-After); a request over `max_request_mb` ({web.max_request_mb} MB) is refused (413),
  unread when its Content-Length says so, cut at the limit when it is streamed; a body that stalls
  `request_timeout` ({web.request_timeout:g} s) gets 408. Multipart boundaries of up to 200
  characters are accepted (RFC 2046 allows 70; Orthanc's DICOMweb client sends 73).
- The whole body is parsed before anything is stored: a body that is not multipart/related, or a
  part that is not application/dicom (415), or a body that ends before its closing boundary (400)
  stores nothing.
- Each instance is checked and stored exactly as a C-STORE instance ([3.2.3](#323-association-acceptance-policy));
  its SOP class and transfer syntax must be ones the C-STORE SCP accepts.
- Response (application/dicom+json), sent after every stored instance is on disk and in the
  journal: a Referenced SOP Sequence item per stored instance, a Failed SOP Sequence item per
  refused one; HTTP 200 when all were stored, 202 when some were, 409 when none.

{_table(["Failure Reason", "meaning"], stow_failures)}

0xA900 is also the reason given for an instance that is not of the study the URL names.

### 3.4 Network interfaces

TCP/IP over whatever interface the host provides; IPv4 and IPv6 (the listen address is
`[node] host`). DICOM over TLS as in [5](#5-security).

### 3.5 Configuration

AE title, listen address and port are `[node] ae_title`, `host`, `port`; each destination's AE
title, host and port, or URL, are in `[[destinations]]`. All limits and timeouts above are
configuration keys with the defaults shown ([configuration reference](configuration.md)).

## 4 Support of character sets

Received instances are stored byte for byte, in any character set. The created instances copy
Specific Character Set and the patient and study attributes element by element from the source
(person names keep their original bytes). Log lines quote no patient attribute.

## 5 Security

- **DICOM over TLS (SCP)**: with `[tls] enabled = true`, the port accepts only TLS, version 1.2 or
  later, with the certificate and key of `cert_file`/`key_file`; with `ca_file`, a client
  certificate signed by that CA is required.
- **DICOM over TLS (SCU)**: a destination with `tls = true` is connected with TLS 1.2 or later,
  verifying its certificate against `ca_file` (or the system's CAs); the host name is not checked
  (DICOM peers are addressed by IP; trust comes from the CA).
- **Access control**: `allowed_hosts` (IP networks), `allowed_calling_aets`,
  `require_called_aet` (default {str(node.require_called_aet).lower()}).
- **Audit**: the journal keeps every job's events (`dicomnode audit`); no ATNA audit messages are
  sent.

## 6 Annexes

### 6.1 IOD contents of created instances

For every source slice, one single-frame Secondary Capture Image (`{sc}`, highdicom `SCImage`),
RGB, 8 bits per sample, Explicit VR Little Endian, in the source's study and a new series:

{_table(["attribute", "value"], iod_rows)}

With `[output] uncertainty = true`, a second series per job: the same IOD with Series Description
`{UNCERTAINTY_DESCRIPTION}` and Series Number source + {UNCERTAINTY_SERIES_OFFSET}. Every created
instance passes `dciodvfy` (dicom3tools) with zero errors.

### 6.2 Private attributes, SOP classes and transfer syntaxes

None: no private attributes are written, and no private or extended SOP classes or transfer
syntaxes are used.

### 6.3 Grayscale image consistency

Not supported: the created images are RGB.
"""]
    return "".join(parts)
