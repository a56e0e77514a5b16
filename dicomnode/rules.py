"""Selection: does a whole, complete series qualify as a sagittal T2 fat-sat spine MR?

Rules are declarative (`[rules]` in node.toml) and every decision carries its reasons, so a
PACS administrator can see why a series was or was not processed (`dicomnode rules test`).
The defaults recognise the main vendors' namings: Siemens `t2_tse_fs_sag`, GE `Sag T2 FSE FS`
or `FatSat` in Scan Options, Philips `T2W_TSE_SPAIR` / `SPIR`; STIR optionally.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from pydicom import Dataset, dcmread

from dicomnode.config import RulesConfig
from dicomnode.frames import FrameError, expand, frame_of, is_multiframe_mr, label
from dicomnode.geometry import GeometryError, plane_of, slice_geometry, stack_of

RULE_NAME = "sagittal-t2-fatsat"
T2_RE = re.compile(r"(?i)(t2|\bfse\b|\btse\b.*\b(fs|spair|spir)\b)")
FAT_SAT_DESC_RE = re.compile(r"(?i)(fat[\s_-]*sat|fatsat|fat[\s_-]*sup|spair|\bspir\b|_spir|spir_|chess|"
                             r"(^|[\s_\-/])fs($|[\s_\-/])|\bfs\b|_fs\b|\bfs_|sfs|dixon[_\s-]*w\b|water)")
FAT_SAT_OPTIONS = {"FS", "SFS", "FAT_SAT", "FATSAT", "SP", "SPIR", "SPAIR", "CHESS", "FSS"}
STIR_RE = re.compile(r"(?i)(stir|tirm)")
T2_MIN_TE_MS = 60.0
T1_MAX_TE_MS = 30.0
T1_MAX_TR_MS = 1000.0


@dataclass
class Decision:
    series_instance_uid: str
    matched: bool
    reason: str
    rule: str | None = None
    checks: list[dict] = field(default_factory=list)
    slices: int = 0
    description: str = ""

    def as_dict(self) -> dict:
        return {"series_instance_uid": self.series_instance_uid, "matched": self.matched, "reason": self.reason,
                "rule": self.rule, "slices": self.slices, "series_description": self.description,
                "checks": self.checks}


def read_headers(paths: Iterable[Path]) -> tuple[dict[str, list[Dataset]], list[tuple[Path, str]]]:
    """Read headers (no pixels) and group them by Series Instance UID; also return unreadable files."""
    groups: dict[str, list[Dataset]] = defaultdict(list)
    bad: list[tuple[Path, str]] = []
    for path in paths:
        try:
            ds = dcmread(path, stop_before_pixels=True)
            groups[str(ds.SeriesInstanceUID)].append(ds)
        except Exception as exc:  # any unreadable file is reported, never fatal
            bad.append((Path(path), str(exc) or type(exc).__name__))
    return dict(groups), bad


def _orientation(ds: Dataset) -> list[float] | None:
    iop = ds.get("ImageOrientationPatient")
    if iop is None:  # enhanced multi-frame: shared functional groups
        try:
            iop = ds.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient
        except (AttributeError, IndexError, KeyError):
            return None
    try:
        vals = [float(v) for v in iop]
    except (TypeError, ValueError):
        return None
    return vals if len(vals) == 6 else None


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    if isinstance(value, (list, tuple)) or hasattr(value, "__iter__") and not isinstance(value, str):
        return "\\".join(str(v) for v in value)
    return str(value or "")


def _float(ds: Dataset, keyword: str) -> float | None:
    try:
        value = ds.get(keyword)
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


class _Checks:
    def __init__(self) -> None:
        self.items: list[dict] = []

    def add(self, name: str, ok: bool, detail: str) -> bool:
        self.items.append({"check": name, "ok": ok, "detail": detail})
        return ok

    def first_failure(self) -> str | None:
        return next((f"{c['check']}: {c['detail']}" for c in self.items if not c["ok"]), None)


def evaluate(cfg: RulesConfig, series_uid: str, headers: Sequence[Dataset]) -> Decision:
    """Evaluate every rule on the whole series; the decision lists each check and its evidence."""
    if not headers:
        return Decision(series_uid, False, "no readable instances")
    sop_classes = {_text(ds, "SOPClassUID") for ds in headers}
    other_multiframe = [ds for ds in headers if int(ds.get("NumberOfFrames", 1) or 1) > 1 and not is_multiframe_mr(ds)]
    try:  # an Enhanced MR instance is read as its frames, each one a slice
        headers = expand(headers, pixels=False)
    except FrameError as exc:
        return Decision(series_uid, False, f"frames: {exc}")
    first = headers[0]
    desc = _text(first, "SeriesDescription") or _text(first, "ProtocolName")
    checks = _Checks()
    slices = len(headers) + sum(int(ds.get("NumberOfFrames", 1) or 1) - 1 for ds in other_multiframe)

    modality = _text(first, "Modality")
    checks.add("modality", modality in cfg.modalities, f"{modality or 'missing'} (want {', '.join(cfg.modalities)})")
    checks.add("sop_class", sop_classes <= set(cfg.sop_classes), ", ".join(sorted(sop_classes)))
    checks.add("single_frame", not other_multiframe,
               "slices or MR frames" if not other_multiframe else
               f"a multi-frame object that is not Enhanced MR ({_text(other_multiframe[0], 'SOPClassUID')})")
    checks.add("slices", cfg.min_slices <= slices <= cfg.max_slices,
               f"{slices} (want {cfg.min_slices}-{cfg.max_slices})")
    if cfg.description_include:
        checks.add("description", bool(re.search(cfg.description_include, desc)), "include pattern")
    if cfg.description_exclude:
        hit = re.search(cfg.description_exclude, desc)
        checks.add("description", hit is None, f"excluded by {hit.group(0)!r}" if hit else "not excluded")

    iop = _orientation(first)
    if cfg.orientation != "any":
        if iop is None:
            checks.add("orientation", False, "no Image Orientation (Patient)")
        else:
            plane, angle = plane_of(iop)
            ok = plane == cfg.orientation and angle <= cfg.max_obliquity_deg
            checks.add("orientation", ok, f"{plane}, {angle:.1f} deg from true {plane} (max {cfg.max_obliquity_deg:g})")

    options = {o.strip().upper() for o in _text(first, "ScanOptions").split("\\") if o.strip()}
    seq_name = _text(first, "SequenceName")
    sequence = " ".join([desc, _text(first, "ProtocolName"), seq_name, _text(first, "PulseSequenceName")])
    te, tr, ti = _float(first, "EchoTime"), _float(first, "RepetitionTime"), _float(first, "InversionTime")
    inversion = "IR" in options or _text(first, "InversionRecovery").upper() == "YES"  # classic or Enhanced MR
    is_stir = bool(STIR_RE.search(sequence)) or (inversion and ti is not None and 100 <= ti <= 250)
    suppression = _text(first, "SpectrallySelectedSuppression").upper()  # Enhanced MR's MR Pulse Sequence

    if cfg.require_t2:
        t1_timing = te is not None and tr is not None and te < T1_MAX_TE_MS and tr < T1_MAX_TR_MS
        by_name = T2_RE.search(sequence)
        by_timing = te is not None and te >= T2_MIN_TE_MS
        if t1_timing:
            checks.add("weighting", False, f"T1-like timing (TE {te:g} ms, TR {tr:g} ms)")
        elif by_name or by_timing or is_stir:
            evidence = f"name {by_name.group(0)!r}" if by_name else (f"TE {te:g} ms" if by_timing else "STIR")
            checks.add("weighting", True, f"T2 ({evidence})")
        else:
            checks.add("weighting", False, "no T2 evidence in description, sequence name or echo time")

    if cfg.require_fat_suppression:
        fs_opts = sorted(options & FAT_SAT_OPTIONS)
        fs_desc = FAT_SAT_DESC_RE.search(sequence)
        if fs_opts:
            checks.add("fat_suppression", True, f"Scan Options {'/'.join(fs_opts)}")
        elif suppression in ("FAT", "FAT_AND_WATER"):
            checks.add("fat_suppression", True, f"Spectrally Selected Suppression {suppression}")
        elif fs_desc:
            checks.add("fat_suppression", True, f"name {fs_desc.group(0).strip(' _-/')!r}")
        elif is_stir:
            checks.add("fat_suppression", cfg.accept_stir,
                       "STIR" + ("" if cfg.accept_stir else " (set [rules] accept_stir = true to accept)"))
        else:
            checks.add("fat_suppression", False, "no fat-suppression evidence (Scan Options, description, sequence)")

    if frame_of(first) is not None:  # a header check read an Enhanced MR's first frame: say so when it fails
        for c in checks.items:
            if not c["ok"] and c["check"] in ("orientation", "weighting", "fat_suppression"):
                c["detail"] += f" ({label(first)})"

    if cfg.require_consistent_geometry:
        checks.add("geometry", *_geometry(headers))

    failure = checks.first_failure()
    if failure:
        return Decision(series_uid, False, failure, None, checks.items, slices, desc)
    evidence = "; ".join(c["detail"] for c in checks.items if c["check"] in ("orientation", "weighting", "fat_suppression"))
    return Decision(series_uid, True, f"{RULE_NAME}: {evidence}; {slices} slices", RULE_NAME, checks.items, slices, desc)


def _geometry(headers: Sequence[Dataset]) -> tuple[bool, str]:
    try:
        stack = stack_of([slice_geometry(ds) for ds in headers], [_label(ds) for ds in headers])
    except GeometryError as exc:
        return False, str(exc)
    first = stack.slices[0]
    what = "frames" if any(frame_of(ds) for ds in headers) else "slices"
    return True, f"{len(headers)} {what} {first.rows}x{first.cols}, spacing {stack.gap:.2f} mm"


def _label(ds: Dataset) -> str:
    return label(ds)


def evaluate_paths(cfg: RulesConfig, paths: Iterable[Path]) -> list[Decision]:
    """Dry-run the rules on files: one decision per series (plus one per unreadable file)."""
    groups, bad = read_headers(paths)
    decisions = [evaluate(cfg, uid, headers) for uid, headers in groups.items()]
    decisions += [Decision("", False, f"unreadable file {p}: {why}") for p, why in bad]
    return decisions
