"""Helpers to build configs and nodes for tests."""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

from pydicom import dcmread
from pynetdicom import AE, evt
from pynetdicom.sop_class import SecondaryCaptureImageStorage

from dicomnode.config import config_from_dict


def make_config(tmp_path: Path, port: int, **sections):
    return config_from_dict(make_raw_config(tmp_path, port, **sections))


def make_raw_config(tmp_path: Path, port: int, **sections) -> dict:
    raw = {
        "node": {"ae_title": "DICOMNODE", "host": "127.0.0.1", "port": port, "storage_dir": str(tmp_path / "store"),
                 "min_free_disk_mb": 1},
        "series": {"quiet_seconds": 3.0},
        "metrics": {"enabled": False},
        "dispatch": {"backoff_initial_seconds": 0.3, "backoff_max_seconds": 1.0, "give_up_after_seconds": 60.0},
    }
    for name, values in sections.items():
        if isinstance(values, dict):
            raw.setdefault(name, {}).update(values)
        else:
            raw[name] = values
    return raw


def dataset_bytes(path: Path) -> bytes:
    """The encoded data set of a Part 10 file, without preamble and file meta information."""
    data = Path(path).read_bytes()
    assert data[128:132] == b"DICM", f"{path} is not Part 10"
    meta_len = int.from_bytes(data[140:144], "little")  # (0002,0000) UL value
    return data[144 + meta_len:]


def sop_uid(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def write_toml(path: Path, raw: dict) -> Path:
    """A minimal TOML writer for test configs (tables, arrays of tables, scalars and lists)."""
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines = []
    for name, table in raw.items():
        for item in table if isinstance(table, list) else [table]:
            lines.append(f"[[{name}]]" if isinstance(table, list) else f"[{name}]")
            lines += [f"{k} = {value(v)}" for k, v in item.items()]
            lines.append("")
    Path(path).write_text("\n".join(lines))
    return Path(path)


def wait_for(pred, timeout: float, interval: float = 0.05) -> bool:
    """Poll `pred` until it is true or `timeout` seconds have passed; return the last answer."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return bool(pred())


class Sink:
    """The PACS: records every arrival (SOP UID, series UID, pixel hash), duplicates included."""

    def __init__(self):
        self.arrivals: list[tuple[str, str, str]] = []
        self.lock = threading.Lock()
        ae = AE(ae_title="PACS")
        ae.add_supported_context(SecondaryCaptureImageStorage)
        self.port = _free_port()
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self.on_store)])

    def on_store(self, event) -> int:
        ds = event.dataset
        with self.lock:
            self.arrivals.append((str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID),
                                  hashlib.sha256(ds.PixelData).hexdigest()))
        return 0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
