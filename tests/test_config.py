from pathlib import Path

import pytest
from typer.testing import CliRunner

from dicomnode.cli import app
from dicomnode.config import ConfigError, load_config

EXAMPLE = Path(__file__).parents[1] / "deploy" / "node.toml"


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "node.toml"
    p.write_text(text)
    return p


def test_example_config_loads():
    cfg = load_config(EXAMPLE)
    assert cfg.node.ae_title and cfg.destinations and cfg.series.quiet_seconds == 10.0


def test_unknown_key_names_file_and_key(tmp_path):
    p = write(tmp_path, "[node]\nae_titel = 'X'\n")
    with pytest.raises(ConfigError, match=r"node\.toml: \[node\]\.ae_titel: unknown key"):
        load_config(p)


def test_wrong_type_names_key(tmp_path):
    p = write(tmp_path, "[node]\nport = '104'\n")
    with pytest.raises(ConfigError, match=r"\[node\]\.port: expected int, got str"):
        load_config(p)


def test_destination_errors_name_the_entry(tmp_path):
    p = write(tmp_path, "[[destinations]]\nname = 'pacs'\nae_title = 'A_TITLE_THAT_IS_TOO_LONG'\nhost='h'\n")
    with pytest.raises(ConfigError, match=r"\[\[destinations\]\]\[0\]\.ae_title"):
        load_config(p)


def test_bad_host_allowlist_and_regex(tmp_path):
    with pytest.raises(ConfigError, match=r"allowed_hosts\[0\]"):
        load_config(write(tmp_path, "[node]\nallowed_hosts = ['10.0.0.300']\n"))
    with pytest.raises(ConfigError, match=r"\[rules\]\.description_include: invalid regular expression"):
        load_config(write(tmp_path, "[rules]\ndescription_include = '(['\n"))


def test_relative_storage_dir_is_relative_to_the_file(tmp_path):
    cfg = load_config(write(tmp_path, "[node]\nstorage_dir = 'spool'\n"))
    assert cfg.node.storage_dir == tmp_path / "spool"


def test_serve_exits_nonzero_on_bad_config(tmp_path):
    p = write(tmp_path, "[nodes]\nport = 1\n")
    result = CliRunner().invoke(app, ["serve", "--config", str(p)])
    assert result.exit_code == 2
    assert "nodes: unknown key" in result.output


def test_the_node_and_its_cli_never_import_ray(tmp_path):
    """Without the extra (`dicomnode[ray]`) nothing changes: the local backend imports no Ray."""
    import subprocess
    import sys

    code = ("import sys; import dicomnode.cli, dicomnode.node, dicomnode.process, dicomnode.config as c; "
            "from dicomnode.node import Node; from dicomnode.config import config_from_dict; "
            f"Node(config_from_dict({{'node': {{'storage_dir': {str(tmp_path)!r}}}, 'metrics': {{'enabled': False}}}}));"
            "assert 'ray' not in sys.modules, 'ray was imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_ray_backend_without_ray_installed_is_a_config_error(tmp_path, monkeypatch):
    import importlib.util

    from dicomnode.config import config_from_dict

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    cfg = config_from_dict({"node": {"storage_dir": str(tmp_path)}, "inference": {"backend": "ray"}})
    with pytest.raises(ConfigError, match=r"\[inference\]\.backend: 'ray' needs Ray.*dicomnode\[ray\]"):
        cfg.check_runtime()
    with pytest.raises(ConfigError, match="ray_actors"):
        config_from_dict({"inference": {"backend": "ray", "ray_actors": 0}})


def test_destination_timeouts_and_concurrency(tmp_path):
    base = "[[destinations]]\nname = 'pacs'\nae_title = 'PACS'\nhost = '127.0.0.1'\n"
    cfg = load_config(write(tmp_path, base + "dimse_timeout = 12.5\nmax_associations = 4\n"))
    (dest,) = cfg.destinations
    assert (dest.connect_timeout, dest.acse_timeout, dest.dimse_timeout, dest.network_timeout) == (5.0, 10.0, 12.5, 60.0)
    assert dest.max_associations == 4
    with pytest.raises(ConfigError, match=r"\[\[destinations\]\]\[0\]\.acse_timeout: must be > 0"):
        load_config(write(tmp_path, base + "acse_timeout = 0.0\n"))
    with pytest.raises(ConfigError, match=r"\[\[destinations\]\]\[0\]\.max_associations: must be <= 16"):
        load_config(write(tmp_path, base + "max_associations = 100\n"))
    with pytest.raises(ConfigError, match=r"\[dispatch\]\.timeout_seconds: unknown key"):
        load_config(write(tmp_path, base + "[dispatch]\ntimeout_seconds = 60.0\n"))


def test_every_problem_is_reported_not_only_the_first(tmp_path):
    p = write(tmp_path, "[node]\nport = '104'\nae_titel = 'X'\n[series]\nquiet_seconds = -1.0\n")
    with pytest.raises(ConfigError) as err:
        load_config(p)
    lines = str(err.value).splitlines()
    assert len(lines) == 3 and all(line.startswith(str(p)) for line in lines), lines
    assert any("[node].port: expected int" in x for x in lines) and any("[node].ae_titel: unknown key" in x for x in lines)
    assert any("[series].quiet_seconds: must be > 0" in x for x in lines)


@pytest.mark.parametrize("body, message", [
    ("url = 'https://pacs.example/dicom-web'\nauth = 'bearer'\n",
     r"\[\[destinations\]\]\[0\]\.credentials_file: required with auth = 'bearer'"),
    ("url = 'https://user:pw@pacs.example/dicom-web'\n",
     r"\[\[destinations\]\]\[0\]\.url: must not hold credentials: put them in credentials_file"),
    ("url = 'ftp://pacs.example/'\n", r"\[\[destinations\]\]\[0\]\.url: must be an http:// or https:// URL"),
    ("url = 'https://pacs.example/dw'\nhost = 'pacs.example'\n",
     r"\[\[destinations\]\]\[0\]\.host: not used with url \(a DICOMweb destination\)"),
    ("url = 'https://pacs.example/dw'\ntls = true\n", r"\[\[destinations\]\]\[0\]\.tls: not used with url"),
    ("url = 'https://pacs.example/dw'\nauth = 'token'\n",
     r"\[\[destinations\]\]\[0\]\.auth: must be one of 'none', 'basic' or 'bearer', got 'token'"),
    ("url = 'https://pacs.example/dw'\nauth = 'basic'\ncredentials_file = 'nowhere.secret'\n",
     r"\[\[destinations\]\]\[0\]\.credentials_file: no such file: .*nowhere\.secret"),
    ("ae_title = 'PACS'\nhost = '127.0.0.1'\nauth = 'basic'\n",
     r"\[\[destinations\]\]\[0\]\.auth: only for a DICOMweb destination \(url\)"),
])
def test_dicomweb_destination_mistakes_say_which_key(tmp_path, body, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, "[[destinations]]\nname = 'web'\n" + body))


def test_dicomweb_destination(tmp_path):
    (tmp_path / "pacs.token").write_text("abc\n")
    cfg = load_config(write(tmp_path, "[[destinations]]\nname = 'web'\nurl = 'https://pacs.example/dicom-web/'\n"
                                      "auth = 'bearer'\ncredentials_file = 'pacs.token'\n"))
    (dest,) = cfg.destinations
    assert dest.dicomweb and dest.url == "https://pacs.example/dicom-web" and dest.hostname == "pacs.example"
    assert dest.credentials_file == tmp_path / "pacs.token" and dest.instances_per_request == 50


def test_config_check_warns_of_a_credentials_file_others_can_read(tmp_path):
    token = tmp_path / "pacs.token"
    token.write_text("abc\n")
    token.chmod(0o644)
    p = write(tmp_path, f"[node]\nstorage_dir = '{tmp_path / 'store'}'\n[[destinations]]\nname = 'web'\n"
                        "url = 'http://127.0.0.1:8042/dicom-web'\nauth = 'bearer'\ncredentials_file = 'pacs.token'\n")
    r = CliRunner().invoke(app, ["config", "check", "--config", str(p)])
    assert r.exit_code == 0, r.output
    assert "credentials_file" in r.output and "chmod 600" in r.output and "web (http://127.0.0.1:8042/dicom-web)" in r.output
    token.chmod(0o600)
    r = CliRunner().invoke(app, ["config", "check", "--config", str(p)])
    assert r.exit_code == 0 and "chmod 600" not in r.output


@pytest.mark.parametrize("body, message", [
    ("[dicomweb]\nenabled = true\n", r"\[dicomweb\]\.tokens_file: required: the STOW-RS service needs bearer tokens"),
    ("[dicomweb]\ntls = true\n", r"\[dicomweb\]\.tls: needs \[tls\] cert_file and key_file"),
    ("[dicomweb]\npath = 'dicom-web'\n", r"\[dicomweb\]\.path: 'dicom-web' does not match"),
    ("[dicomweb]\nmax_request_mb = 0\n", r"\[dicomweb\]\.max_request_mb: must be >= 1"),
    ("[dicomweb]\ntokens_file = 'none.tokens'\n", r"\[dicomweb\]\.tokens_file: no such file"),
])
def test_stow_rs_service_mistakes_say_which_key(tmp_path, body, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, body))
