"""The STOW-RS service ([dicomweb]): instances stored over DICOMweb by dicomweb-client and by a real
Orthanc (its DICOMweb client) go the way of C-STORE instances: journalled, assembled, selected,
processed. Bad requests get a 4xx, store nothing, and the node serves on."""

from __future__ import annotations

import json
import socket
import time
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
import requests

from dicomnode.config import config_from_dict
from dicomnode.node import Node
from tests.support.dicomfactory import make_series
from tests.support.doubles import CopyProcessor
from tests.support.nodehelpers import dataset_bytes, make_raw_config, wait_for
from tests.support.orthanc import ORTHANC, OrthancServer
from tests.support.peers import free_port
from tests.support.tlscerts import make_certs

pytestmark = pytest.mark.integration
TOKEN = "stow-token-8f3a1c9e2b7d4a60"
DICOMWEB = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def stow_node(tmp_path: Path, port: int, **web) -> tuple[Node, str, Path]:
    tokens = tmp_path / "stow.tokens"
    tokens.write_text(f"# who token\nscanner-router {TOKEN}\n")
    http_port = free_port()
    raw = make_raw_config(tmp_path, port, series={"quiet_seconds": 1.0},
                          dicomweb={"enabled": True, "port": http_port, "tokens_file": str(tokens), **web})
    return Node(config_from_dict(raw), CopyProcessor()), f"http://127.0.0.1:{http_port}/dicom-web", tokens


def client(url: str, token: str = TOKEN):
    from dicomweb_client.api import DICOMwebClient

    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {token}"
    return DICOMwebClient(url=url, session=session)


def multipart(parts: list[bytes], boundary: str = "b0undary", close: bool = True) -> tuple[bytes, dict]:
    body = b"".join(b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + p + b"\r\n"
                    for p in parts)
    if close:
        body += b"--" + boundary.encode() + b"--\r\n"
    return body, {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
                  "Authorization": f"Bearer {TOKEN}"}


def test_a_series_stored_with_stow_rs_is_processed_like_a_c_store_one(tmp_path, port):
    node, url, _ = stow_node(tmp_path, port)
    files = make_series(tmp_path / "in", slices=10)
    with node:
        response = client(url).store_instances([pydicom.dcmread(f) for f in files])
        uids = {str(pydicom.dcmread(f).SOPInstanceUID) for f in files}
        assert {str(i.ReferencedSOPInstanceUID) for i in response.ReferencedSOPSequence} == uids
        assert "FailedSOPSequence" not in response or not response.FailedSOPSequence
        # acknowledged means on disk and in the journal, byte for byte what was sent
        for f in files:
            inst = node.journal.instance(str(pydicom.dcmread(f).SOPInstanceUID))
            assert inst is not None and inst.calling_aet == "scanner-router"
            assert dataset_bytes(Path(inst.path)) == dataset_bytes(f)
        assert node.wait_idle(60)
        (job,) = node.journal.jobs()
        assert job.state == "done" and job.outputs == len(files)


@pytest.mark.skipif(not (Path(ORTHANC).exists() and DICOMWEB.exists()), reason="Orthanc with its DICOMweb plugin")
def test_orthanc_pushes_a_study_to_the_node_with_its_dicomweb_client(tmp_path, port):
    node, url, _ = stow_node(tmp_path, port)
    files = make_series(tmp_path / "in", slices=9)
    orthanc = OrthancServer(tmp_path, {"DicomWeb": {"Enable": True, "Root": "/dicom-web/", "Servers": {
        "node": {"Url": url + "/", "HttpHeaders": {"Authorization": f"Bearer {TOKEN}"}}}}}, plugins=[str(DICOMWEB)])
    try:
        ids = [orthanc.post_instance(f.read_bytes())["ID"] for f in files]
        study = orthanc.get(f"/instances/{ids[0]}/study")["ID"]
        with node:
            import urllib.request

            req = urllib.request.Request(orthanc.url("/dicom-web/servers/node/stow"), method="POST",
                                         data=json.dumps({"Resources": [study]}).encode(),
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=60) as r:
                assert r.status == 200
            assert node.wait_idle(60)
            assert node.journal.instance_count() == len(files)
            (job,) = node.journal.jobs()
            assert job.state == "done" and job.outputs == len(files)
    finally:
        orthanc.stop()


def _raw(port: int, head: bytes, body: bytes = b"", wait: float = 10.0) -> bytes:
    """Send a request as bytes and return the start of the answer (the server may answer, and
    close, before it has read everything)."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
        try:
            s.sendall(head + body)
        except OSError:
            pass
        try:
            return s.recv(65536)
        except ConnectionResetError:
            return b""


def test_bad_requests_get_4xx_store_nothing_and_the_node_serves_on(tmp_path, port):
    node, url, tokens = stow_node(tmp_path, port, max_request_mb=1, request_timeout=2.0)
    files = make_series(tmp_path / "in", slices=8)
    good = [f.read_bytes() for f in files]
    big = [f.read_bytes() for f in make_series(tmp_path / "big", slices=3, rows=512, cols=512)]  # 1.5 MB
    http_port = int(url.split(":")[2].split("/")[0])
    with node:
        body, headers = multipart(good[:2])
        cases = {
            "no token": (body, {k: v for k, v in headers.items() if k != "Authorization"}, 401),
            "wrong token": (body, {**headers, "Authorization": "Bearer not-the-token"}, 401),
            "not multipart": (good[0], {**headers, "Content-Type": "application/dicom"}, 415),
            "a part that is not DICOM": (*multipart([b"this is not DICOM" * 20]), 409),
            "truncated": (*multipart(good[:2], close=False), 400),
            "a part cut short": (multipart(good[:1])[0][:-200], headers, 400),
            "over the size limit": (*multipart(big), 413),
        }
        for name, (data, hdrs, expected) in cases.items():
            r = requests.post(url + "/studies", data=data, headers=hdrs, timeout=30)
            assert r.status_code == expected, (name, r.status_code, r.text)
        # a 2 GB body announced: refused from its headers, unread
        reply = _raw(http_port, b"POST /dicom-web/studies HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode()
                     + b"\r\nContent-Type: multipart/related; type=\"application/dicom\"; boundary=b\r\n"
                     b"Content-Length: 2147483648\r\n\r\n", b"--b\r\n")
        assert reply.startswith(b"HTTP/1.1 413")
        # a streamed (chunked) body past the limit is cut at the limit
        payload = multipart(big)[0]
        chunks = f"{len(payload):x}\r\n".encode() + payload + b"\r\n0\r\n\r\n"
        reply = _raw(http_port, b"POST /dicom-web/studies HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode()
                     + b"\r\nContent-Type: multipart/related; type=\"application/dicom\"; boundary=b0undary\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n", chunks)
        assert reply.startswith(b"HTTP/1.1 413")
        # a body that stalls gets 408 after request_timeout
        t0 = time.time()
        reply = _raw(http_port, b"POST /dicom-web/studies HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode()
                     + b"\r\nContent-Type: multipart/related; type=\"application/dicom\"; boundary=b0undary\r\n"
                     b"Content-Length: 100000\r\n\r\n", b"--b0undary\r\nContent-Type: application/dicom\r\n\r\nDICM")
        assert reply.startswith(b"HTTP/1.1 408") and time.time() - t0 < 10
        assert node.journal.instance_count() == 0  # nothing of any of them was kept
        # a tokens file that cannot be read lets nobody in (and the node serves on)
        tokens.rename(tmp_path / "moved")
        assert requests.post(url + "/studies", data=body, headers=headers, timeout=30).status_code == 401
        (tmp_path / "moved").rename(tokens)
        # a revoked token stops working at once
        tokens.write_text("# nobody\n")
        assert requests.post(url + "/studies", data=body, headers=headers, timeout=30).status_code == 401
        tokens.write_text(f"scanner-router {TOKEN}\n")
        r = requests.post(url + "/studies", data=body, headers=headers, timeout=30)
        assert r.status_code == 200, r.text
        assert len(r.json()["00081199"]["Value"]) == 2 and node.journal.instance_count() == 2


def test_more_requests_than_allowed_at_once_get_503(tmp_path, port):
    node, url, _ = stow_node(tmp_path, port, max_concurrent_requests=1, request_timeout=5.0)
    http_port = int(url.split(":")[2].split("/")[0])
    good = make_series(tmp_path / "in", slices=8)[0].read_bytes()
    with node:
        slow = socket.create_connection(("127.0.0.1", http_port), timeout=10)
        try:  # one request that has sent its headers and part of its body
            slow.sendall(b"POST /dicom-web/studies HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode()
                         + b"\r\nContent-Type: multipart/related; type=\"application/dicom\"; boundary=b0undary\r\n"
                         b"Content-Length: 100000\r\n\r\n--b0undary\r\n")
            time.sleep(0.5)
            r = requests.post(url + "/studies", data=multipart([good])[0], headers=multipart([good])[1], timeout=10)
            assert r.status_code == 503 and r.headers.get("Retry-After")
        finally:
            slow.close()
        assert wait_for(lambda: requests.post(url + "/studies", data=multipart([good])[0],
                                              headers=multipart([good])[1], timeout=10).status_code == 200, 10)


def test_https_with_client_certificates_instead_of_tokens(tmp_path, port):
    certs = make_certs(tmp_path / "pki")
    http_port = free_port()
    raw = make_raw_config(tmp_path, port, series={"quiet_seconds": 1.0},
                          tls={"cert_file": str(certs["server.crt"]), "key_file": str(certs["server.key"]),
                               "ca_file": str(certs["ca.crt"])},
                          dicomweb={"enabled": True, "port": http_port, "tls": True})
    url = f"https://127.0.0.1:{http_port}/dicom-web/studies"
    good = make_series(tmp_path / "in", slices=8)[0].read_bytes()
    body, headers = multipart([good])
    del headers["Authorization"]
    with Node(config_from_dict(raw), CopyProcessor()) as node:
        r = requests.post(url, data=body, headers=headers, verify=str(certs["ca.crt"]),
                          cert=(str(certs["client.crt"]), str(certs["client.key"])), timeout=30)
        assert r.status_code == 200, r.text
        assert node.journal.instance(str(pydicom.dcmread(BytesIO(good)).SOPInstanceUID)).calling_aet == "client"
        # No client certificate: refused. With TLS 1.3 the server's alert can arrive after the client
        # thinks the handshake is done, so the client sees an SSL error or a closed connection.
        with pytest.raises(requests.exceptions.ConnectionError):  # SSLError is one
            requests.post(url, data=body, headers=headers, verify=str(certs["ca.crt"]), timeout=30)
        with pytest.raises(requests.exceptions.ConnectionError):  # plain HTTP on the TLS port
            requests.post(url.replace("https", "http"), data=body, headers=headers, timeout=30)
        assert node.journal.instance_count() == 1
