import json

import pytest
from typer.testing import CliRunner

from dicomnode.cli import app
from dicomnode.config import config_from_dict
from dicomnode.node import Node
from tests.support.dicomfactory import make_series
from tests.support.nodehelpers import make_raw_config, write_toml
from tests.support.peers import dcmtk, run

COMMANDS = [[], ["serve"], ["echo"], ["send"], ["status"], ["rules"], ["rules", "test"], ["queue"],
            ["queue", "list"], ["queue", "retry"], ["queue", "purge"]]


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: " ".join(c) or "top")
def test_help_everywhere(cmd):
    result = CliRunner().invoke(app, cmd + ["--help"])
    assert result.exit_code == 0 and "Usage" in result.output


@pytest.mark.integration
def test_echo_send_and_status_against_a_running_node(tmp_path, port):
    raw = make_raw_config(tmp_path, port)
    toml = write_toml(tmp_path / "node.toml", raw)
    make_series(tmp_path / "in", slices=5)
    with Node(config_from_dict(raw)) as node:
        r = CliRunner().invoke(app, ["echo", "127.0.0.1", str(port), "--aec", "DICOMNODE"])
        assert r.exit_code == 0 and "0x0000" in r.output
        r = CliRunner().invoke(app, ["send", str(tmp_path / "in"), "--port", str(port), "--aec", "DICOMNODE"])
        assert r.exit_code == 0 and "stored 5 of 5" in r.output
        assert node.journal.instance_count() == 5
        r = CliRunner().invoke(app, ["status", "--config", str(toml), "--json"])
        status = json.loads(r.output)
        assert status["echo"] is True and status["instances"] == 5
    r = CliRunner().invoke(app, ["echo", "127.0.0.1", str(port), "--aec", "DICOMNODE", "--timeout", "2"])
    assert r.exit_code == 1 and "C-ECHO failed" in r.output


def test_send_to_a_dcmtk_storescp(tmp_path):
    import subprocess
    import time

    from tests.support.peers import free_port

    make_series(tmp_path / "in", slices=3)
    (tmp_path / "sink").mkdir()
    for _ in range(3):  # a free port can be taken between choosing it and binding it: choose again
        port = free_port()
        proc = subprocess.Popen([dcmtk("storescp"), "-od", str(tmp_path / "sink"), str(port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(50):
            if proc.poll() is not None or run([dcmtk("echoscu"), "127.0.0.1", str(port)], check=False).returncode == 0:
                break
            time.sleep(0.1)
        if proc.poll() is None:
            break
    try:
        assert proc.poll() is None, "storescp did not start"
        r = CliRunner().invoke(app, ["send", str(tmp_path / "in"), "--port", str(port), "--aec", "ANY-SCP"])
        assert r.exit_code == 0, r.output
        assert len(list((tmp_path / "sink").iterdir())) == 3
    finally:
        proc.terminate()
        proc.wait()


def test_the_node_process_imports_neither_torch_nor_the_tools():
    """`serve` wires every stage without torch (it lives in the inference process) or dicomnode.tools."""
    import subprocess
    import sys

    code = ("import sys, dicomnode.cli, dicomnode.cli_node, dicomnode.node; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('dicomnode.tools')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
