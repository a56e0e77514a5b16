"""Fetch a site's PET/MR examinations from its PACS: C-FIND (Study Root), then C-GET.

`python -m training retrieve --csv ROWS.csv --out EXPORT --host H --port P --called-aet PACS`

Each CSV row names an examination by `accession_number`, or by `patient_id` and `study_date`
(YYYYMMDD). For every study found, the PT series are fetched whole; of the MR series, one image
is fetched first and the node's own rules (`dicomnode.rules`) decide whether the series is a
sagittal T2FS worth fetching. Files land in EXPORT/<study>/<series>/<SOP>.dcm; a fetched series
gets a `.complete` marker, and a rerun skips it. Rows run in parallel (`--workers`), one
association each. EXPORT/retrieve-report.csv gives one line per row: found, not found, refused,
timed out or incomplete, with the reason. The export holds patient data as the PACS sent it:
`build-dataset` is what de-identifies.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import re
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Iterator, Sequence

from pydicom import dcmread
from pydicom.dataset import Dataset

log = logging.getLogger(__name__)

UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
PT_STORAGE = "1.2.840.10008.5.1.4.1.1.128"
STORAGE = (MR_STORAGE, PT_STORAGE)
PROBE_IGNORES = {"slices", "geometry"}  # checks one probe image cannot answer
MARKER = ".complete"
REPORT = "retrieve-report.csv"
PENDING = (0xFF00, 0xFF01)


class Outcome(str, Enum):
    FOUND = "found"
    NOT_FOUND = "not found"
    REFUSED = "refused"
    TIMED_OUT = "timed out"
    INCOMPLETE = "incomplete"


class RowError(Exception):
    def __init__(self, outcome: Outcome, reason: str):
        super().__init__(reason)
        self.outcome = outcome


@dataclass
class Peer:
    host: str
    port: int
    called_aet: str
    calling_aet: str = "DICOMNODE-RT"
    timeout: float = 30.0


@dataclass
class RowResult:
    row: int
    query: str
    outcome: Outcome = Outcome.NOT_FOUND
    studies: int = 0
    series_fetched: int = 0
    series_already: int = 0
    instances: int = 0
    reason: str = ""
    notes: list[str] = field(default_factory=list)

    def as_row(self) -> dict:
        return {"row": self.row, "query": self.query, "status": self.outcome.value, "studies": self.studies,
                "series_fetched": self.series_fetched, "series_already_here": self.series_already,
                "instances": self.instances, "reason": "; ".join([self.reason, *self.notes]).strip("; ")}


def read_rows(path: Path) -> list[Dataset]:
    """Study-level C-FIND identifiers from the CSV (raises ValueError naming the bad row)."""
    out = []
    with open(path, newline="", encoding="utf-8-sig") as fh:
        for n, row in enumerate(csv.DictReader(fh), start=2):
            row = {k.strip().lower(): (v or "").strip() for k, v in row.items() if k}
            q = Dataset()
            q.QueryRetrieveLevel = "STUDY"
            q.StudyInstanceUID = ""
            if row.get("accession_number"):
                q.AccessionNumber = row["accession_number"]
            elif row.get("patient_id") and re.fullmatch(r"\d{8}", row.get("study_date", "")):
                q.PatientID, q.StudyDate = row["patient_id"], row["study_date"]
            else:
                raise ValueError(f"{path} line {n}: needs accession_number, or patient_id and study_date (YYYYMMDD)")
            out.append(q)
    return out


def _describe(q: Dataset) -> str:
    return f"accession {q.AccessionNumber}" if "AccessionNumber" in q else f"patient {q.PatientID} on {q.StudyDate}"


class Session:
    """One association with the PACS for one CSV row; stores what C-GET sends into `out`."""

    def __init__(self, peer: Peer, out: Path):
        from pynetdicom import AE, build_role, evt
        from pynetdicom.sop_class import (
            StudyRootQueryRetrieveInformationModelFind,
            StudyRootQueryRetrieveInformationModelGet,
        )

        self.find_model, self.get_model = StudyRootQueryRetrieveInformationModelFind, StudyRootQueryRetrieveInformationModelGet
        self.out = out
        self.expect: set[str] = set()  # series UIDs a C-STORE may deliver now
        self.into = out  # where the current C-GET's instances go
        self.stored: list[Path] = []  # what the current C-GET stored
        ae = AE(ae_title=peer.calling_aet)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = peer.timeout
        ae.add_requested_context(self.find_model)
        ae.add_requested_context(self.get_model)
        for cx in STORAGE:
            ae.add_requested_context(cx)
        roles: list = [build_role(cx, scp_role=True) for cx in STORAGE]
        started = time.monotonic()
        self.assoc = ae.associate(peer.host, peer.port, ae_title=peer.called_aet, ext_neg=roles,
                                  evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        if not self.assoc.is_established:
            if self.assoc.is_rejected:
                raise RowError(Outcome.REFUSED, "association rejected by the PACS")
            if time.monotonic() - started < 0.9 * peer.timeout:
                # an answer well before the timeout: a PACS that closes the connection with (or
                # instead of) its rejection reads as an abort here
                raise RowError(Outcome.REFUSED, "association refused or aborted by the PACS")
            raise RowError(Outcome.TIMED_OUT, f"no answer to the association request within {peer.timeout:g} s")

    def _on_store(self, event) -> int:
        """Thin handler: check where the instance belongs, write its bytes, return."""
        ds = event.dataset
        study, series, sop = (str(ds.get(k, "")) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"))
        if not all(UID_RE.match(u) and len(u) <= 64 for u in (study, series, sop)):
            return 0xC210  # cannot understand: a UID that is no UID (and would make no safe path)
        if series not in self.expect:
            return 0xA900  # not what was asked for
        folder = self.into / study / series
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{sop}.part"
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as fh:
            fh.write(event.encoded_dataset())
            fh.flush()
            os.fsync(fh.fileno())  # on disk before the series' marker can say it is complete
        os.replace(tmp, folder / f"{sop}.dcm")
        self.stored.append(folder / f"{sop}.dcm")
        return 0x0000

    def find(self, query: Dataset) -> Iterator[Dataset]:
        for status, ident in self.assoc.send_c_find(query, self.find_model):
            code = _status(status)
            if code in PENDING and ident is not None:
                yield ident
            elif code != 0x0000:
                raise _dimse_error("C-FIND", code)

    def get(self, query: Dataset, series_uid: str, into: Path) -> tuple[int, list[Path]]:
        """C-GET one series (or one image) into `into`; (failed sub-operations, files stored)."""
        self.expect, self.into, self.stored = {series_uid}, into, []
        final = None
        try:
            for status, _ in self.assoc.send_c_get(query, self.get_model):
                final = status
        finally:
            self.expect = set()
        code = _status(final)
        if code not in (0x0000, 0xB000):
            raise _dimse_error("C-GET", code)
        assert final is not None
        return int(final.get("NumberOfFailedSubOperations", 0) or 0), list(self.stored)

    def release(self) -> None:
        if self.assoc.is_established:
            self.assoc.release()


def _status(status: Dataset | None) -> int | None:
    return int(status.Status) if status is not None and "Status" in status else None


def _dimse_error(what: str, code: int | None) -> RowError:
    if code is None:
        return RowError(Outcome.TIMED_OUT, f"{what}: no response (timed out or aborted)")
    return RowError(Outcome.REFUSED, f"{what} refused with status 0x{code:04X}")


def _series_query(study_uid: str) -> Dataset:
    q = Dataset()
    q.QueryRetrieveLevel = "SERIES"
    q.StudyInstanceUID = study_uid
    q.SeriesInstanceUID = ""
    q.Modality = ""
    q.SeriesDescription = ""
    q.NumberOfSeriesRelatedInstances = ""
    return q


def _probe_matches(session: Session, study_uid: str, series_uid: str) -> tuple[bool, str]:
    """Fetch one image of an MR series and ask the node's rules (checks a lone image cannot
    answer, slice count and stack geometry, are left to build-dataset)."""
    from dicomnode.config import RulesConfig
    from dicomnode.rules import evaluate

    q = Dataset()
    q.QueryRetrieveLevel, q.StudyInstanceUID, q.SeriesInstanceUID, q.SOPInstanceUID = "IMAGE", study_uid, series_uid, ""
    sops = [str(i.SOPInstanceUID) for i in list(session.find(q)) if UID_RE.match(str(i.get("SOPInstanceUID", "")))]
    if not sops:
        return False, "no images"
    q.SOPInstanceUID = sops[0]
    _, got = session.get(q, series_uid, session.out / ".probe")
    if not got:
        return False, "probe image not delivered"
    header = dcmread(got[0], stop_before_pixels=True)
    for p in got:
        p.unlink(missing_ok=True)
    decision = evaluate(RulesConfig(), series_uid, [header])
    failed = [c for c in decision.checks if not c["ok"] and c["check"] not in PROBE_IGNORES]
    return not failed, (f"{failed[0]['check']}: {failed[0]['detail']}" if failed else "sagittal T2FS")


def fetch_row(peer: Peer, out: Path, index: int, query: Dataset) -> RowResult:
    result = RowResult(index, _describe(query))
    try:
        session = Session(peer, out)
    except RowError as exc:
        result.outcome, result.reason = exc.outcome, str(exc)
        return result
    try:
        studies = [str(i.StudyInstanceUID) for i in list(session.find(query))
                   if UID_RE.match(str(i.get("StudyInstanceUID", "")))]
        result.studies = len(studies)
        if not studies:
            result.outcome, result.reason = Outcome.NOT_FOUND, "no study matches"
            return result
        missing = []
        for study in studies:
            kinds = {"T2FS": 0, "PT": 0}
            for s in list(session.find(_series_query(study))):  # the whole answer before the next request
                uid, modality = str(s.get("SeriesInstanceUID", "")), str(s.get("Modality", ""))
                if not UID_RE.match(uid) or modality not in ("MR", "PT"):
                    continue
                folder = out / study / uid
                if (folder / MARKER).exists():
                    result.series_already += 1
                    kinds["PT" if modality == "PT" else "T2FS"] += 1
                    continue
                if modality == "MR":
                    ok, why = _probe_matches(session, study, uid)
                    if not ok:
                        continue
                expected = s.get("NumberOfSeriesRelatedInstances")
                q = Dataset()
                q.QueryRetrieveLevel, q.StudyInstanceUID, q.SeriesInstanceUID = "SERIES", study, uid
                failed, files = session.get(q, uid, out)
                got = len(files)
                result.instances += got
                if failed or (expected not in (None, "") and got < int(expected)) or got == 0:
                    raise RowError(Outcome.INCOMPLETE, f"series {modality}: {got} of {expected or '?'} images arrived "
                                                       f"({failed} failed)")
                (folder / MARKER).write_text(json.dumps({"instances": got, "modality": modality}))
                result.series_fetched += 1
                kinds["PT" if modality == "PT" else "T2FS"] += 1
            missing += [f"no {k} series" for k, v in kinds.items() if not v]
        if missing:
            result.outcome, result.reason = Outcome.INCOMPLETE, ", ".join(sorted(set(missing)))
        else:
            result.outcome = Outcome.FOUND
    except RowError as exc:
        result.outcome, result.reason = exc.outcome, str(exc)
    finally:
        session.release()
    return result


def retrieve(rows: Sequence[Dataset], out: Path, peer: Peer, workers: int = 2, progress=None) -> list[RowResult]:
    """Fetch every row (bounded by `workers` associations at once); writes OUT/retrieve-report.csv."""
    out.mkdir(parents=True, exist_ok=True)
    lock = threading.Lock()

    def one(item: tuple[int, Dataset]) -> RowResult:
        res = fetch_row(peer, out, *item)
        log.info("row %d: %s", res.row, res.outcome.value)
        if progress is not None:
            with lock:
                progress()
        return res

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = list(pool.map(one, enumerate(rows, start=1)))
    shutil.rmtree(out / ".probe", ignore_errors=True)  # emptied probe folders
    with open(out / REPORT, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(results[0].as_row()) if results else ["row"])
        w.writeheader()
        w.writerows(r.as_row() for r in results)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training retrieve", description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--csv", required=True, type=Path, help="rows: accession_number, or patient_id + study_date")
    ap.add_argument("--out", required=True, type=Path, help="export folder (resumable: fetched series are kept)")
    ap.add_argument("--host", required=True)
    ap.add_argument("--port", required=True, type=int)
    ap.add_argument("--called-aet", required=True, help="the PACS's AE title")
    ap.add_argument("--calling-aet", default="DICOMNODE-RT", help="this command's AE title, as the PACS knows it")
    ap.add_argument("--workers", type=int, default=2, help="associations at once (default 2)")
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds for association and each response")
    a = ap.parse_args(argv)
    try:
        rows = read_rows(a.csv)
    except (OSError, ValueError) as exc:
        print(f"retrieve: {exc}", file=sys.stderr)
        return 2
    from rich.progress import Progress

    t0 = time.perf_counter()
    with Progress(transient=True) as bar:
        task = bar.add_task("examinations", total=len(rows))
        results = retrieve(rows, a.out, Peer(a.host, a.port, a.called_aet, a.calling_aet, a.timeout), a.workers,
                           progress=lambda: bar.advance(task))
    counts: dict[str, int] = {}
    for r in results:
        counts[r.outcome.value] = counts.get(r.outcome.value, 0) + 1
    print(f"{len(results)} rows in {time.perf_counter() - t0:.1f} s: "
          + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) + f" -> {a.out / REPORT}")
    for r in results:
        if r.outcome is not Outcome.FOUND:
            print(f"  row {r.row}: {r.outcome.value}: {r.reason}")  # the query itself only in the report
    return 0 if all(r.outcome is Outcome.FOUND for r in results) else 1
