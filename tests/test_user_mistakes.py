"""Every mistake a new user or an operator is likely to make: the real `dicomnode` command, run as
a process, must exit non-zero with one clear line naming what is wrong, and never a traceback."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.dicomfactory import make_series
from tests.support.nodehelpers import make_raw_config, write_toml
from tests.support.peers import dcmtk, free_port, run, wait_for_node

CLI = [sys.executable, "-m", "dicomnode.cli"]


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout)
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    return proc


def node_toml(tmp_path: Path, port: int, **sections) -> Path:
    raw = make_raw_config(tmp_path, port, **{"inference": {"model": "none"}, **sections})
    return write_toml(tmp_path / "node.toml", raw)


# -- storage_dir and --config -------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["proc", "file", "under-a-file"])
def test_unusable_storage_dir_is_a_config_error(tmp_path, port, kind):
    (tmp_path / "afile").write_text("x")
    storage = {"proc": "/proc/dicomnode", "file": str(tmp_path / "afile"),
               "under-a-file": str(tmp_path / "afile" / "spool")}[kind]
    toml = node_toml(tmp_path, port, node={"storage_dir": storage})
    for command in ("serve", "config check"):
        r = cli(*command.split(), "--config", toml, timeout=60)
        assert r.returncode == 2, r.stderr
        assert "[node].storage_dir:" in r.stderr and str(toml) in r.stderr
    assert {"proc": "kernel virtual file system", "file": "is a file, not a folder",
            "under-a-file": "cannot be created"}[kind] in r.stderr


def test_read_only_storage_dir_is_a_config_error(tmp_path, port):
    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], capture_output=True).returncode:
        pytest.skip("cannot mount a read-only tmpfs here")
    try:
        toml = node_toml(tmp_path, port, node={"storage_dir": str(ro / "spool")})
        r = cli("serve", "--config", toml, timeout=60)
        assert r.returncode == 2 and "[node].storage_dir:" in r.stderr
        assert "read-only" in r.stderr or "not writable" in r.stderr, r.stderr
    finally:
        subprocess.run(["umount", str(ro)], check=False)


def test_config_that_is_a_directory(tmp_path):
    r = cli("serve", "--config", tmp_path)
    assert r.returncode == 2 and f"{tmp_path}: is a directory" in r.stderr


# -- ports --------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["dicom", "metrics"])
def test_port_in_use_names_the_port_and_key(tmp_path, which):
    dicom, metrics = free_port(), free_port()
    toml = node_toml(tmp_path, dicom, metrics={"enabled": True, "host": "127.0.0.1", "port": metrics})
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", dicom if which == "dicom" else metrics))
        squatter.listen()
        r = cli("serve", "--config", toml, timeout=60)
    assert r.returncode == 1
    key, port = ("[node].port", dicom) if which == "dicom" else ("[metrics].port", metrics)
    assert f"{key}: cannot listen for" in r.stderr and f"127.0.0.1:{port}: already in use" in r.stderr, r.stderr


# -- association rejections ---------------------------------------------------------------------
@pytest.mark.integration
def test_rejected_ae_titles_reach_the_sender_and_the_log_names_the_right_one(tmp_path, port):
    toml = node_toml(tmp_path, port, node={"allowed_calling_aets": ["PACS"]})
    log = tmp_path / "serve.log"
    with log.open("w") as err:
        proc = subprocess.Popen([*CLI, "serve", "--config", str(toml)], stderr=err, stdout=err)
    try:
        wait_for_node(proc, port, calling_aet="PACS")
        wrong_called = run([dcmtk("echoscu"), "-aet", "PACS", "-aec", "NOTTHENODE", "127.0.0.1", str(port)],
                           check=False)
        wrong_calling = run([dcmtk("echoscu"), "-aet", "STRANGER", "-aec", "DICOMNODE", "127.0.0.1", str(port)],
                            check=False)
        ok = run([dcmtk("echoscu"), "-aet", "PACS", "-aec", "DICOMNODE", "127.0.0.1", str(port)], check=False)
        own_scu = cli("echo", "127.0.0.1", port, "--aec", "NOTTHENODE", "--aet", "PACS", "--timeout", "5")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert "Rejected Permanent, Source: Service User" in wrong_called.stderr
    assert "Called AE Title Not Recognized" in wrong_called.stderr
    assert "Calling AE Title Not Recognized" in wrong_calling.stderr
    assert ok.returncode == 0
    text = log.read_text()
    assert "(called AE title not recognised): called AE 'NOTTHENODE' (this node is 'DICOMNODE')" in text
    assert "(calling AE title not recognised): calling AE 'STRANGER'" in text
    # the node's own SCU says why too
    assert own_scu.returncode == 1
    assert f"rejected by NOTTHENODE@127.0.0.1:{port}: Called AE title not recognised" in own_scu.stderr


# -- destinations -------------------------------------------------------------------------------
def test_destination_without_ae_title_says_missing(tmp_path, port):
    toml = node_toml(tmp_path, port, destinations=[{"name": "pacs", "host": "127.0.0.1", "port": 104}])
    r = cli("config", "check", "--config", toml)
    assert r.returncode == 2
    assert "[[destinations]][0].ae_title: missing" in r.stderr and "got ''" not in r.stderr


def test_destination_host_that_does_not_resolve(tmp_path, port):
    toml = node_toml(tmp_path, port, destinations=[{"name": "pacs", "ae_title": "PACS",
                                                    "host": "no-such-pacs.invalid", "port": 104}])
    for command in ("config check", "serve"):
        r = cli(*command.split(), "--config", toml, timeout=60)
        assert r.returncode == 2, r.stderr
        assert "[[destinations]][0].host: 'no-such-pacs.invalid' is neither an IP address nor a resolvable" in r.stderr


def test_no_destinations_warns_at_start(tmp_path, port):
    r = cli("config", "check", "--config", node_toml(tmp_path, port))
    assert r.returncode == 0, r.stderr
    assert "no [[destinations]] configured" in r.stderr and ": OK" in r.stdout


# -- status and queue on a node that never ran / does not answer --------------------------------
def test_config_check_on_a_node_that_never_ran(tmp_path, port):
    toml = node_toml(tmp_path, port, destinations=[{"name": "pacs", "ae_title": "PACS", "host": "localhost"}])
    r = cli("config", "check", "--config", toml)
    assert r.returncode == 0, r.stderr
    assert "listens as DICOMNODE on 127.0.0.1" in r.stdout and "pacs (PACS@localhost:104)" in r.stdout
    assert not (tmp_path / "store").exists()  # checking creates nothing


def test_config_check_verifies_the_model(tmp_path, port):
    toml = node_toml(tmp_path, port, inference={"model": str(tmp_path / "nomodel")})
    r = cli("config", "check", "--config", toml)
    assert r.returncode == 2 and "[inference].model:" in r.stderr and "does not exist" in r.stderr


def test_status_of_a_node_that_does_not_answer_is_non_zero(tmp_path, port):
    from dicomnode.journal import Journal

    toml = node_toml(tmp_path, port)
    (tmp_path / "store").mkdir()
    Journal(tmp_path / "store" / "journal.sqlite").close()
    r = cli("status", "--config", toml)
    assert r.returncode == 1 and "does not answer C-ECHO" in r.stderr
    assert cli("status", "--config", toml, "--no-ping").returncode == 0


def test_queue_list_states_and_header(tmp_path, port):
    from dicomnode.journal import STATES, Journal

    toml = node_toml(tmp_path, port)
    r = cli("queue", "list", "--config", toml)
    assert r.returncode == 2 and "no journal" in r.stderr
    (tmp_path / "store").mkdir()
    Journal(tmp_path / "store" / "journal.sqlite").close()
    r = cli("queue", "list", "--config", toml, "--state", "finished")
    assert r.returncode == 2 and "unknown state 'finished'" in r.stderr and ", ".join(STATES) in r.stderr
    r = cli("queue", "list", "--config", toml)
    assert r.returncode == 0 and r.stdout.strip() == "no jobs"


# -- folders without DICOM ----------------------------------------------------------------------
@pytest.mark.parametrize("command", ["rules test", "send"])
@pytest.mark.parametrize("content", ["empty", "no-dicom"])
def test_folders_without_dicom(tmp_path, port, command, content):
    folder = tmp_path / "in"
    folder.mkdir()
    if content == "no-dicom":
        (folder / "notes.txt").write_text("not an image")
    r = cli(*command.split(), folder, *(["--port", port] if command == "send" else []))
    assert r.returncode == 2
    assert ("no files in" if content == "empty" else "no DICOM") in r.stderr, r.stderr


def test_rules_test_on_dicom_still_works(tmp_path):
    make_series(tmp_path / "in", slices=3)
    r = cli("rules", "test", tmp_path / "in")
    assert r.returncode == 0 and ("MATCH" in r.stdout or "REJECT" in r.stdout)


# -- devices ------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["demo", "infer"])
@pytest.mark.parametrize("device", ["gpu", "cuda"])
def test_device_without_cuda_is_one_sentence(tmp_path, command, device):
    import torch

    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    make_series(tmp_path / "in", slices=2)
    args = ["--out", tmp_path / "demo"] if command == "demo" else [tmp_path / "in", tmp_path / "out"]
    r = cli(command, *args, "--device", device)
    assert r.returncode == 2
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("--device:"), r.stderr
    assert "without a model" not in r.stderr and "Expected one of" not in r.stderr


@pytest.mark.parametrize("command", ["pix2pix", "select", "cddpm", "finish", "evaluate"])
@pytest.mark.parametrize("device", ["gpu", "cuda"])
def test_training_device_without_cuda_is_one_sentence(tmp_path, command, device):
    import torch

    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = subprocess.run([sys.executable, "-m", "training", command, "--device", device], capture_output=True,
                          text=True, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("--device:"), proc.stderr


def test_config_check_with_a_device_this_machine_lacks_is_one_sentence(tmp_path, port):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    toml = node_toml(tmp_path, port, inference={"model": "default", "device": "cuda"})
    r = cli("config", "check", "--config", toml)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "[inference].device:" in lines[0] and "no usable CUDA GPU" in lines[0]


def test_help_shows_section_names():
    r = cli("rules", "test", "--help")
    assert "[rules]" in r.stdout
