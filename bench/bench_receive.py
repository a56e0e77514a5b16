"""Receive throughput, side by side: DCMTK storescu -> dicomnode, Orthanc, DCMTK storescp and a
bare pynetdicom SCP (the library's own floor: its handler only takes the bytes).

Every receiver gets the same files from the same sender, in interleaved rounds (machine noise hits
all of them alike), over one association and over 4 concurrent associations (4 storescu
processes, a quarter of the files each). The median of the rounds is reported, with the ratio to
Orthanc.

What "stored" means differs, and the table says so: dicomnode fsyncs every instance (file, folder
and its SQLite journal, synchronous=FULL) before it answers; Orthanc 1.10 writes the file and its
SQLite index (SyncStorageArea, on by default, fsyncs the file); DCMTK storescp and the bare
pynetdicom SCP do not fsync at all.

    python bench/bench_receive.py                       # 300 x 512^2 and 300 x 256^2, 1 and 4 senders
    python bench/bench_receive.py --n 100 --sizes 256 --rounds 1 --only dicomnode orthanc
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from dicomnode.node import Node  # noqa: E402
from tests.support.dicomfactory import make_series  # noqa: E402
from tests.support.nodehelpers import make_config  # noqa: E402

STORESCU, STORESCP, ECHOSCU = "/usr/bin/storescu", "/usr/bin/storescp", "/usr/bin/echoscu"
ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
RECEIVERS = ("storescp", "pynetdicom", "orthanc", "dicomnode")
# An experiment, not a mode of the node (docs/benchmarks.md): dicomnode plus a second, receive-only
# process listening on the same port (SO_REUSEPORT) and sharing the spool and the WAL journal.
EXPERIMENTS = ("dicomnode-2proc",)
# DCMTK leaves Nagle's algorithm on unless TCP_NODELAY=1; with it on, every C-STORE waits ~40 ms
# for a delayed ACK on loopback, which would make the comparison about TCP, not about storage.
os.environ.setdefault("TCP_NODELAY", "1")

BARE_SCP = textwrap.dedent("""
    import sys
    from pynetdicom import AE, AllStoragePresentationContexts, ALL_TRANSFER_SYNTAXES, evt
    from pynetdicom.sop_class import Verification
    ae = AE(ae_title="DICOMNODE")
    ae.maximum_associations = 16
    ae.maximum_pdu_size = 0
    ae.add_supported_context(Verification)
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    def on_store(event):
        event.request.DataSet.getvalue()   # take the bytes; store nothing
        return 0x0000
    ae.start_server(("127.0.0.1", int(sys.argv[1])), evt_handlers=[(evt.EVT_C_STORE, on_store)])
""")


RECEIVE_ONLY = textwrap.dedent("""
    import sys, time
    sys.path[:0] = sys.argv[3:]
    import bench_receive
    bench_receive.reuse_port()
    from dicomnode.config import config_from_dict
    from dicomnode.journal import Journal
    from dicomnode.receive import StoreSCP
    from dicomnode.spool import Spool
    cfg = config_from_dict({"node": {"ae_title": "DICOMNODE", "host": "127.0.0.1", "port": int(sys.argv[1]),
                                     "storage_dir": sys.argv[2], "min_free_disk_mb": 1}})
    scp = StoreSCP(cfg, Spool(cfg.node.storage_dir), Journal(cfg.journal_path))
    scp.start()
    while True:
        time.sleep(3600)
""")


def reuse_port() -> None:
    """Let several processes listen on one port (the kernel spreads connections over them)."""
    import socket as so

    from dicomnode.listener import GuardedAssociationServer

    bind = GuardedAssociationServer.server_bind
    if getattr(bind, "reuse_port", False):
        return

    def server_bind(self):
        self.socket.setsockopt(so.SOL_SOCKET, so.SO_REUSEPORT, 1)
        bind(self)

    server_bind.reuse_port = True
    GuardedAssociationServer.server_bind = server_bind


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_echo(port: int, proc: subprocess.Popen | None = None, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while subprocess.run([ECHOSCU, "-aec", "DICOMNODE", "127.0.0.1", str(port)], capture_output=True).returncode:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"receiver exited with {proc.returncode}")
        if time.time() > deadline:
            raise RuntimeError(f"nothing answers C-ECHO on port {port}")
        time.sleep(0.1)


def send(port: int, folders: list[Path]) -> float:
    """storescu per folder, all at once; seconds until the last one is done."""
    t0 = time.perf_counter()
    procs = [subprocess.Popen([STORESCU, "-aec", "DICOMNODE", "+sd", "127.0.0.1", str(port), str(f)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for f in folders]
    for p in procs:
        _, err = p.communicate()
        if p.returncode:
            raise RuntimeError(f"storescu failed: {err.decode(errors='replace')[-400:]}")
    return time.perf_counter() - t0


class Subprocess:
    """A receiver run as its own program, started on a free loopback port and stopped afterwards."""

    def __init__(self, argv_for_port, work: Path):
        self.port = free_port()
        self.log = open(work / "receiver.log", "w")
        self.proc = subprocess.Popen(argv_for_port(self.port), stdout=self.log, stderr=subprocess.STDOUT)

    def __enter__(self):
        wait_echo(self.port, self.proc)
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def orthanc(work: Path) -> Subprocess:
    http = free_port()
    cfg = work / "orthanc.json"

    def argv(port):
        cfg.write_text(json.dumps({
            "Name": "bench", "StorageDirectory": str(work / "db"), "IndexDirectory": str(work / "db"),
            "HttpPort": http, "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "Plugins": [],
            "DicomAet": "DICOMNODE", "DicomPort": port, "DicomCheckCalledAet": False,
            "DicomAlwaysAllowEcho": True, "DicomAlwaysAllowStore": True, "DicomCheckModalityHost": False,
            "StableAge": 3600, "DicomThreadsCount": 8}))
        return [ORTHANC, str(cfg)]

    return Subprocess(argv, work)


def orthanc_version() -> str:
    out = subprocess.run([ORTHANC, "--version"], capture_output=True, text=True).stdout.split()
    return out[1] if len(out) > 1 else "?"


def run_one(name: str, folders: list[Path], work: Path) -> float:
    work.mkdir(parents=True)
    if name.startswith("dicomnode"):
        port = free_port()
        cfg = make_config(work / "node", port, series={"quiet_seconds": 3600.0},  # as served: metrics on
                          metrics={"enabled": True, "port": free_port()}, inference={"model": "none"})
        with Node(cfg) as node:
            if name == "dicomnode":
                return send(port, folders)
            helper = subprocess.Popen([sys.executable, "-c", RECEIVE_ONLY, str(port), str(cfg.node.storage_dir),
                                       str(Path(__file__).resolve().parent), *sys.path[:2]])
            try:
                time.sleep(3.0)  # both listening before the first connection
                t = send(port, folders)
            finally:
                helper.terminate()
                helper.wait()
            expected = sum(1 for f in folders for _ in f.iterdir())
            assert node.journal.instance_count() == expected, "an acknowledged instance is missing from the journal"
            return t
    if name == "storescp":
        (work / "out").mkdir()
        recv = Subprocess(lambda p: [STORESCP, "-od", str(work / "out"), str(p)], work)
    elif name == "pynetdicom":
        recv = Subprocess(lambda p: [sys.executable, "-c", BARE_SCP, str(p)], work)
    else:
        recv = orthanc(work)
    with recv as r:
        return send(r.port, folders)


def make_input(root: Path, n: int, size: int, senders: int) -> list[Path]:
    """n instances of size^2 split over `senders` folders, in series of at most 20 slices."""
    folders = [root / f"s{i}" for i in range(senders)]
    seed = 0
    for i, folder in enumerate(folders):
        share = n // senders + (i < n % senders)
        for start in range(0, share, 20):
            make_series(folder, slices=min(20, share - start), rows=size, cols=size, seed=seed)
            seed += 1
    return folders


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 256])
    ap.add_argument("--senders", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", nargs="+", choices=RECEIVERS + EXPERIMENTS, default=list(RECEIVERS))
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    if "dicomnode-2proc" in args.only:
        reuse_port()
    work = Path(tempfile.mkdtemp(prefix="bench-receive-"))
    rows = []
    try:
        print(f"storescu -> receiver, {args.n} MR instances, median of {args.rounds} interleaved rounds; "
              f"Orthanc {orthanc_version()}, {os.cpu_count()} CPUs")
        for size in args.sizes:
            for senders in args.senders:
                folders = make_input(work / f"in-{size}-{senders}", args.n, size, senders)
                mb = sum(p.stat().st_size for f in folders for p in f.iterdir()) / 2**20
                times: dict[str, list[float]] = {name: [] for name in args.only}
                for r in range(args.rounds):
                    for name in args.only:
                        times[name].append(run_one(name, folders, work / f"r-{size}-{senders}-{r}-{name}"))
                        shutil.rmtree(work / f"r-{size}-{senders}-{r}-{name}", ignore_errors=True)
                med = {k: statistics.median(v) for k, v in times.items()}
                print(f"\n{size}x{size}, {senders} association(s) at once, {mb:.0f} MB")
                for name, t in med.items():
                    ratio = f"{t / med['orthanc']:5.2f}x Orthanc's time" if "orthanc" in med else ""
                    print(f"  {name:<16} {t:6.2f} s  {args.n / t:7.1f} inst/s  {mb / t:6.1f} MB/s  {ratio}"
                          f"   (rounds: {', '.join(f'{x:.2f}' for x in times[name])})")
                    rows.append({"size": size, "senders": senders, "receiver": name, "seconds": t,
                                 "rounds": times[name], "instances": args.n, "mb": mb})
                shutil.rmtree(work / f"in-{size}-{senders}", ignore_errors=True)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
