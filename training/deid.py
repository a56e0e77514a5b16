"""Pseudonyms and new UIDs for the paired data set, keyed by a site secret.

DICOM PS3.15 Annex E's Basic Application Level Confidentiality Profile is the reference: names,
patient IDs, accession numbers, dates and original UIDs leave nothing in the data set. Patients
get `P` + 12 hex digits of HMAC-SHA256(site key, patient), UIDs get `2.25.` + an integer of
HMAC-SHA256(site key, uid): the same site key gives the same pseudonyms in every build (splits and
follow-up studies stay with their patient), and without the key they cannot be reversed. The
key map (pseudonym -> original values) is written apart from the data set, mode 0600.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import os
import secrets
from pathlib import Path

KEY_BYTES = 32
MAP_FIELDS = ["kind", "pseudonym", "original", "patient_pseudonym", "accession_number", "study_date"]


def _write_private(path: Path, text: str) -> None:
    """Write `text` to a new file only its owner can read (0600 from the start, no window)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", newline="") as fh:
        fh.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def load_or_create_key(path: Path) -> bytes:
    """The site key (hex in a 0600 file); a new random one is written when the file is absent."""
    path = Path(path)
    if path.exists():
        key = bytes.fromhex(path.read_text().strip())
        if len(key) < 16:
            raise ValueError(f"{path}: site key shorter than 16 bytes")
        return key
    key = secrets.token_bytes(KEY_BYTES)
    _write_private(path, key.hex() + "\n")
    return key


class Pseudonymizer:
    """Keyed pseudonyms; remembers every mapping it made for the key map."""

    def __init__(self, key: bytes):
        self._key = key
        self.rows: dict[tuple[str, str], dict[str, str]] = {}

    def _digest(self, kind: str, value: str) -> bytes:
        return hmac.new(self._key, f"{kind}\x00{value}".encode(), hashlib.sha256).digest()

    def patient(self, patient_id: str, issuer: str = "") -> str:
        original = f"{issuer}|{patient_id}" if issuer else patient_id
        out = "P" + self._digest("patient", original).hex()[:12].upper()
        self.rows.setdefault(("patient", out), {"kind": "patient", "pseudonym": out, "original": patient_id})
        return out

    def uid(self, original: str, kind: str = "uid", **extra: str) -> str:
        out = f"2.25.{int.from_bytes(self._digest('uid', original)[:16], 'big')}"
        row = self.rows.setdefault((kind, out), {"kind": kind, "pseudonym": out, "original": original})
        row.update({k: v for k, v in extra.items() if v})
        return out

    def write_map(self, path: Path) -> None:
        """pseudonym -> original values, CSV, mode 0600."""
        import io

        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=MAP_FIELDS, restval="")
        w.writeheader()
        w.writerows(sorted(self.rows.values(), key=lambda r: (r["kind"], r["pseudonym"])))
        _write_private(Path(path), buf.getvalue())
