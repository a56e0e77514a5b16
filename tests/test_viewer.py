"""What the radiologist sees: a phantom series stored into a real Orthanc is routed by the shipped
Lua script to `dicomnode serve` (shipped model), the synthetic series comes back, and headless
Chromium opens it in Orthanc's web viewer. The screenshot is kept (tmp_path, and
$DICOMNODE_ARTEFACTS when set); docs/img/viewer_synthetic.png is one such screenshot."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dicomnode.tools.phantom import write_case
from tests.support.nodehelpers import make_raw_config, write_toml
from tests.support.orthanc import ORTHANC, routing_orthanc
from tests.support.peers import wait_for_node

pytestmark = [pytest.mark.integration, pytest.mark.slow]

WEB_VIEWER = Path("/usr/share/orthanc/plugins/libOrthancWebViewer.so")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SHIPPED = Path(__file__).resolve().parents[1] / "models" / "t2fs2petfusion" / "model.json"
CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1280,800", "--virtual-time-budget=20000"]


@pytest.mark.skipif(not (Path(ORTHANC).exists() and WEB_VIEWER.exists() and Path(CHROMIUM).exists()
                         and SHIPPED.exists()),
                    reason="needs Orthanc with orthanc-webviewer, Debian chromium and the shipped model")
def test_the_synthetic_series_in_orthancs_web_viewer(tmp_path, port):
    orthanc = routing_orthanc(tmp_path, port, plugins=[str(WEB_VIEWER)])
    raw = make_raw_config(
        tmp_path, port, series={"quiet_seconds": 2.0},
        node={"allowed_calling_aets": ["PACS"], "allowed_hosts": ["127.0.0.1"]},
        inference={"model": "default", "device": "cpu"},
        destinations=[{"name": "orthanc", "ae_title": "PACS", "host": "127.0.0.1", "port": orthanc.dicom_port}])
    node = subprocess.Popen([sys.executable, "-m", "dicomnode.cli", "serve", "--config",
                             str(write_toml(tmp_path / "node.toml", raw))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_node(node, port, calling_aet="PACS")
        case = write_case(tmp_path / "phantom", 7, rows=256, slices=10, lesion=True)
        ids = [orthanc.post_instance(Path(p).read_bytes())["ID"] for p in case["mr"]]
        study = orthanc.get(f"/instances/{ids[0]}/study")["ID"]
        deadline, derived = time.time() + 300, None
        while derived is None:
            assert node.poll() is None and time.time() < deadline, "no synthetic series arrived in Orthanc"
            for s in orthanc.get(f"/studies/{study}/series"):
                if s["MainDicomTags"].get("Modality") != "MR" and len(s["Instances"]) == len(ids):
                    derived = s
            time.sleep(1)
        url = orthanc.url(f"/web-viewer/app/viewer.html?series={derived['ID']}")
        shot = tmp_path / "viewer.png"
        chrome = [CHROMIUM, *CHROME_FLAGS, f"--user-data-dir={tmp_path / 'chrome'}"]
        subprocess.run([*chrome, f"--screenshot={shot}", url], capture_output=True, timeout=120, check=True)
        dom = subprocess.run([*chrome, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    finally:
        node.send_signal(signal.SIGTERM)
        node.wait(60)
        orthanc.stop()
    assert "SYNTHETIC PET/T2FS FUSION - NOT FOR DIAGNOSIS" in dom  # the viewer shows the series description
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float32)
    image_area = pixels[100:700, 300:980]  # the viewport, away from the overlay text
    assert image_area.std() > 20 and (image_area[..., 0] > image_area[..., 2] + 20).mean() > 0.05  # a red-hot fusion
    if os.environ.get("DICOMNODE_ARTEFACTS"):
        target = Path(os.environ["DICOMNODE_ARTEFACTS"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, target / "viewer_synthetic.png")
