"""STOW-RS delivery to a DICOMweb destination, with dicomweb-client over a requests session.

The files are sent as stored (read and written back by pydicom, pixel data untouched), at most
`instances_per_request` in one multipart request to URL/studies. The STOW-RS response names each
instance: those in its Referenced SOP Sequence are stored (a Warning Reason counts as stored, as
a C-STORE warning does), those in its Failed SOP Sequence are not, and an instance the response
does not mention is not stored either. `on_progress(path, stored)` is called for every file once
its request has been answered, so the journal records exactly what the service acknowledged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import pydicom
import requests
from pydicom.errors import InvalidDicomError

from dicomnode.config import DestinationAuth, DestinationConfig
from dicomnode.scu import StoreReport

# HTTP statuses that mean the service is there but cannot take anything now: the destination is
# held with backoff, as when it cannot be reached at all.
UNAVAILABLE = {429, 502, 503, 504}


class StowUnreachable(Exception):
    """No answer: the connection failed or timed out, or the service said it is unavailable."""


class StowRefused(Exception):
    """The service answered the request as a whole with an error (authentication, a bad URL, ...)."""


def session_for(dest: DestinationConfig) -> requests.Session:
    """A session with the destination's authentication (read now from its credentials file) and CA."""
    s = requests.Session()
    s.trust_env = False  # no proxy or netrc from the environment: the config says where results go
    s.max_redirects = 0  # results go to the configured URL, nowhere a response points to
    if dest.ca_file is not None:
        s.verify = str(dest.ca_file)
    if dest.auth != DestinationAuth.NONE:
        assert dest.credentials_file is not None  # the config checks it
        secret = Path(dest.credentials_file).read_text(encoding="utf-8").strip()
        if dest.auth == DestinationAuth.BASIC:
            user, sep, password = secret.partition(":")
            if not sep:
                raise StowRefused(f"{dest.credentials_file}: expected user:password")
            s.auth = (user, password)
        else:
            s.headers["Authorization"] = f"Bearer {secret}"
    return s


def _outcome(ds: pydicom.Dataset) -> tuple[set[str], dict[str, str]]:
    """(stored SOP Instance UIDs, failed UID -> reason) from a STOW-RS response."""
    stored = {str(item.get("ReferencedSOPInstanceUID", "")) for item in ds.get("ReferencedSOPSequence", [])}
    failed = {str(item.get("ReferencedSOPInstanceUID", "")): f"failure reason 0x{int(item.get('FailureReason', 0)):04X}"
              for item in ds.get("FailedSOPSequence", [])}
    return stored - {""}, failed


def _error_body(response: requests.Response) -> pydicom.Dataset:
    kind = response.headers.get("Content-Type", "").split(";")[0].strip()
    if kind not in ("application/dicom+json", "application/json"):
        raise StowRefused(f"HTTP {response.status_code}: a STOW-RS response of type {kind or 'none'}")
    try:
        return pydicom.Dataset.from_json(response.json())
    except (ValueError, TypeError, KeyError) as exc:
        raise StowRefused(f"HTTP {response.status_code}: unreadable STOW-RS response: {exc}") from None


def _client(dest: DestinationConfig, session: requests.Session):
    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(url=dest.url or "", session=session, timeout=(dest.connect_timeout, dest.network_timeout))
    client.set_http_retry_params(retry=False)  # one request per attempt: dispatch owns backoff and dead letter
    return client


def stow_files(paths: Sequence[Path], dest: DestinationConfig,
               on_progress: Callable[[Path, bool], None] | None = None) -> StoreReport:
    """Store the files with STOW-RS; raises StowUnreachable or StowRefused when a request gets no
    per-instance answer (the instances acknowledged by earlier requests have been reported)."""
    report = StoreReport()
    session = session_for(dest)
    client = _client(dest, session)
    try:
        for start in range(0, len(paths), dest.instances_per_request):
            batch: list[tuple[Path, pydicom.Dataset]] = []
            for path in paths[start:start + dest.instances_per_request]:
                try:
                    batch.append((path, pydicom.dcmread(path)))
                except (InvalidDicomError, OSError) as exc:
                    report.failed.append((str(path), f"not a DICOM Part 10 file: {exc}"))
            if not batch:
                continue
            stored, failed = _post(client, [ds for _, ds in batch])
            for path, ds in batch:
                uid = str(ds.SOPInstanceUID)
                ok = uid in stored and uid not in failed
                if ok:
                    report.stored += 1
                else:
                    report.failed.append((str(path), failed.get(uid, "not in the STOW-RS response")))
                if on_progress is not None:
                    on_progress(path, ok)
    finally:
        session.close()
    return report


def _post(client, datasets: list[pydicom.Dataset]) -> tuple[set[str], dict[str, str]]:
    try:
        return _outcome(client.store_instances(datasets))
    except requests.HTTPError as exc:
        response = exc.response
        if response is None or response.status_code in UNAVAILABLE:
            raise StowUnreachable(str(exc)) from None
        if response.status_code == 409 and response.content:  # some or all instances failed: says which
            return _outcome(_error_body(response))
        raise StowRefused(f"HTTP {response.status_code} {response.reason}") from None
    except requests.TooManyRedirects:
        raise StowRefused("the service answered with a redirect; configure the URL it points to") from None
    except (requests.ConnectionError, requests.Timeout) as exc:
        raise StowUnreachable(f"{type(exc).__name__}: {exc}") from None
    except (ValueError, KeyError) as exc:  # a 2xx body dicomweb-client could not read
        raise StowRefused(f"unreadable STOW-RS response: {exc}") from None
