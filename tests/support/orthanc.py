"""A real Orthanc for tests, started on random ports and stopped afterwards.

Orthanc 1.10 cannot bind to loopback only, so it listens with remote HTTP access off and DICOM
limited to the peers a test names (AE title and host checked): nothing else can store, echo or
query it.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.support.peers import free_port

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "orthanc"
ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"


def _orthanc_json(path: Path) -> dict:
    """Orthanc's JSON with // comments (the only comment style the shipped file uses)."""
    return json.loads(re.sub(r"^\s*//.*$", "", path.read_text(), flags=re.M))


class OrthancServer:
    """`extra` is one more configuration file (a dict), merged by Orthanc with the base one.
    With `users` (name -> password), HTTP needs basic authentication; the helpers use the first."""

    def __init__(self, root: Path, extra: dict | None = None, plugins: list[str] | None = None,
                 users: dict[str, str] | None = None, http_port: int | None = None):
        self.http_port, self.dicom_port = http_port or free_port(), free_port()
        self.users = dict(users or {})
        cfg = root / "orthanc-config"
        cfg.mkdir()
        if extra:
            (cfg / "extra.json").write_text(json.dumps(extra))
        (cfg / "test.json").write_text(json.dumps({
            "Name": "dicomnode-test", "StorageDirectory": str(root / "orthanc-db"),
            "IndexDirectory": str(root / "orthanc-db"), "Plugins": plugins or [],
            "HttpPort": self.http_port, "RemoteAccessAllowed": False, "AuthenticationEnabled": bool(self.users),
            **({"RegisteredUsers": self.users} if self.users else {}),
            "DicomAet": "PACS", "DicomPort": self.dicom_port, "DicomCheckCalledAet": True,
            "DicomAlwaysAllowEcho": False, "DicomAlwaysAllowStore": False, "DicomCheckModalityHost": True,
        }))
        self.log = open(root / "orthanc.log", "w")
        self.proc = subprocess.Popen([ORTHANC, str(cfg)], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 30
        while True:
            try:
                self.get("/system")
                return
            except (urllib.error.URLError, ConnectionError):
                assert self.proc.poll() is None, f"Orthanc exited:\n{self.log_text()}"
                assert time.time() < deadline, "Orthanc did not come up"
                time.sleep(0.2)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http_port}{path}"

    def _auth(self) -> dict[str, str]:
        if not self.users:
            return {}
        user, password = next(iter(self.users.items()))
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}

    def get(self, path: str):
        with urllib.request.urlopen(urllib.request.Request(self.url(path), headers=self._auth()), timeout=10) as r:
            return json.loads(r.read())

    def post_instance(self, data: bytes) -> dict:
        req = urllib.request.Request(self.url("/instances"), data=data, method="POST",
                                     headers={"Content-Type": "application/dicom", **self._auth()})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    def log_text(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def routing_orthanc(root: Path, node_port: int, plugins: list[str] | None = None) -> OrthancServer:
    """Orthanc with the shipped routing (deploy/orthanc/) pointed at a node on `node_port`."""
    routing = _orthanc_json(DEPLOY / "dicomnode.json")
    routing["DicomModalities"]["dicomnode"][1:] = ["127.0.0.1", node_port]
    routing["LuaScripts"] = [str(DEPLOY / "dicomnode-route.lua")]
    routing["StableAge"] = 2  # seconds: the whole upload lands well within it
    return OrthancServer(root, routing, plugins)
