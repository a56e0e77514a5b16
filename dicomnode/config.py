"""node.toml -> a typed, validated configuration.

Every problem is reported as `FILE: [section].key: reason`, and unknown keys are errors, so a
typo in a hospital's config fails at start instead of silently falling back to a default.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import socket
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

AE_TITLE_RE = re.compile(r"^[\x20-\x7e]{1,16}$")
DEVICE_RE = re.compile(r"auto|cpu|cuda(:\d+)?")


class ConfigError(ValueError):
    """A configuration problem; the message names the file, the key and the reason."""


@dataclass
class NodeConfig:
    ae_title: str = "DICOMNODE"
    host: str = "127.0.0.1"
    port: int = 11112
    storage_dir: Path = Path("/var/lib/dicomnode")
    allowed_calling_aets: list[str] = field(default_factory=list)  # empty: any caller
    allowed_hosts: list[str] = field(default_factory=list)  # IPs or CIDR networks; empty: any
    require_called_aet: bool = True
    max_associations: int = 10
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    network_timeout: float = 120.0
    min_free_disk_mb: int = 1024  # below this, C-STORE answers 0xA700 (out of resources)
    max_pdu: int = 0  # 0: unlimited

    def validate(self, where: str) -> None:
        _check_ae(self.ae_title, f"{where}.ae_title")
        for i, aet in enumerate(self.allowed_calling_aets):
            _check_ae(aet, f"{where}.allowed_calling_aets[{i}]")
        for i, host in enumerate(self.allowed_hosts):
            try:
                ipaddress.ip_network(host, strict=False)
            except ValueError as exc:
                raise ConfigError(f"{where}.allowed_hosts[{i}]: {exc}") from None
        _check_port(self.port, f"{where}.port")
        _check_positive(where, "max_associations", "acse_timeout", "dimse_timeout", "network_timeout", obj=self)
        if self.min_free_disk_mb < 0:
            raise ConfigError(f"{where}.min_free_disk_mb: must be >= 0")


@dataclass
class TLSConfig:
    enabled: bool = False
    cert_file: Path | None = None
    key_file: Path | None = None
    ca_file: Path | None = None  # when set, clients must present a certificate signed by it

    def validate(self, where: str) -> None:
        if not self.enabled:
            return
        for name in ("cert_file", "key_file"):
            if getattr(self, name) is None:
                raise ConfigError(f"{where}.{name}: required when TLS is enabled")
        for name in ("cert_file", "key_file", "ca_file"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"{where}.{name}: no such file: {path}")


@dataclass
class SeriesConfig:
    quiet_seconds: float = 10.0  # complete after this long without a new instance
    settle_seconds: float = 0.5  # a series that declares its size completes this long after its last instance
    late_instance_policy: str = "reprocess"  # or "ignore"

    def validate(self, where: str) -> None:
        _check_positive(where, "quiet_seconds", obj=self)
        if not 0 <= self.settle_seconds <= 1.0:
            raise ConfigError(f"{where}.settle_seconds: must be between 0 and 1 second")
        if self.late_instance_policy not in ("reprocess", "ignore"):
            raise ConfigError(f"{where}.late_instance_policy: must be 'reprocess' or 'ignore'")


@dataclass
class RulesConfig:
    """Declarative selection; every criterion must hold for a series to be processed."""

    modalities: list[str] = field(default_factory=lambda: ["MR"])
    sop_classes: list[str] = field(default_factory=lambda: [
        "1.2.840.10008.5.1.4.1.1.4",  # MR Image Storage
        "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR Image Storage
    ])
    orientation: str = "sagittal"  # sagittal | axial | coronal | any
    max_obliquity_deg: float = 25.0
    description_include: str = ""  # optional regex the SeriesDescription must match
    description_exclude: str = r"(?i)(\bt1|t1w|t1_|_t1|pd\b|pdw|dwi|diff|adc|\btrace|localizer|scout|survey|mip|dixon_(w|in|opp))"
    require_t2: bool = True
    require_fat_suppression: bool = True
    accept_stir: bool = False
    min_slices: int = 8
    max_slices: int = 64
    require_consistent_geometry: bool = True

    def validate(self, where: str) -> None:
        if self.orientation not in ("sagittal", "axial", "coronal", "any"):
            raise ConfigError(f"{where}.orientation: must be sagittal, axial, coronal or any")
        if not 0 <= self.max_obliquity_deg <= 90:
            raise ConfigError(f"{where}.max_obliquity_deg: must be between 0 and 90")
        for key in ("description_include", "description_exclude"):
            try:
                re.compile(getattr(self, key))
            except re.error as exc:
                raise ConfigError(f"{where}.{key}: invalid regular expression: {exc}") from None
        if self.min_slices < 1 or self.max_slices < self.min_slices:
            raise ConfigError(f"{where}.min_slices/max_slices: need 1 <= min_slices <= max_slices")


@dataclass
class DestinationConfig:
    name: str = ""
    ae_title: str = ""
    host: str = ""
    port: int = 104
    tls: bool = False
    ca_file: Path | None = None

    def validate(self, where: str) -> None:
        for key in ("name", "ae_title", "host"):
            if not getattr(self, key):
                raise ConfigError(f"{where}.{key}: missing (every destination needs name, ae_title and host)")
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", self.name):
            raise ConfigError(f"{where}.name: letters, digits, '_', '.', '-' only, got {self.name!r}")
        _check_ae(self.ae_title, f"{where}.ae_title")
        _check_port(self.port, f"{where}.port")
        if self.ca_file is not None and not Path(self.ca_file).is_file():
            raise ConfigError(f"{where}.ca_file: no such file: {self.ca_file}")


@dataclass
class DispatchConfig:
    calling_ae_title: str = ""  # default: the node's own AE title
    backoff_initial_seconds: float = 30.0
    backoff_max_seconds: float = 3600.0
    give_up_after_seconds: float = 86400.0  # then the delivery goes to the dead letter
    timeout_seconds: float = 60.0

    def validate(self, where: str) -> None:
        if self.calling_ae_title:
            _check_ae(self.calling_ae_title, f"{where}.calling_ae_title")
        _check_positive(where, "backoff_initial_seconds", "backoff_max_seconds", "give_up_after_seconds",
                        "timeout_seconds", obj=self)
        if self.backoff_max_seconds < self.backoff_initial_seconds:
            raise ConfigError(f"{where}.backoff_max_seconds: must be >= backoff_initial_seconds")


@dataclass
class RetentionConfig:
    keep_hours: float = 72.0  # processed series and spool files older than this are removed
    check_interval_minutes: float = 30.0

    def validate(self, where: str) -> None:
        _check_positive(where, "keep_hours", "check_interval_minutes", obj=self)


@dataclass
class MetricsConfig:
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 9108

    def validate(self, where: str) -> None:
        _check_port(self.port, f"{where}.port")


@dataclass
class InferenceConfig:
    model: str = "default"  # a folder under models/ or a path to a model folder
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    sampler: str = "fast"  # fast | ddpm
    # Unset (the default): the values the model card was validated with. Set them only to
    # override the card; they change the pixels, so they also change the output UIDs.
    steps: int | None = None  # denoiser evaluations per sample (fast samplers)
    warm_start: float | None = None  # noise level the Pix2Pix output is refined from (1.0 = pure noise)
    samples: int | None = None  # samples averaged per slice (their SD is the uncertainty)
    seed: int = 0
    batch_size: int = 1  # slices per forward pass; the K samples of a slice already form a batch
    timeout_seconds: float = 600.0  # watchdog per job: the inference process is killed and restarted
    crash_retries: int = 1  # a job whose inference process dies is retried this often, then fails
    start_timeout_seconds: float = 600.0  # for the inference process to load the model
    banner: bool = True

    def validate(self, where: str) -> None:
        if not DEVICE_RE.fullmatch(self.device):
            raise ConfigError(f"{where}.device: must be auto, cpu, cuda or cuda:N")
        if self.sampler not in ("fast", "ddpm"):
            raise ConfigError(f"{where}.sampler: must be 'fast' or 'ddpm'")
        for key in ("steps", "samples", "batch_size"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ConfigError(f"{where}.{key}: must be >= 1")
        if self.warm_start is not None and not 0.0 < self.warm_start <= 1.0:
            raise ConfigError(f"{where}.warm_start: must be in (0, 1]")
        _check_positive(where, "timeout_seconds", "start_timeout_seconds", obj=self)
        if self.crash_retries < 0:
            raise ConfigError(f"{where}.crash_retries: must be >= 0")


@dataclass
class LoggingConfig:
    level: str = "INFO"  # logs never carry patient names or IDs

    def validate(self, where: str) -> None:
        if self.level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(f"{where}.level: must be DEBUG, INFO, WARNING or ERROR")


@dataclass
class Config:
    node: NodeConfig = field(default_factory=NodeConfig)
    tls: TLSConfig = field(default_factory=TLSConfig)
    series: SeriesConfig = field(default_factory=SeriesConfig)
    rules: RulesConfig = field(default_factory=RulesConfig)
    destinations: list[DestinationConfig] = field(default_factory=list)
    dispatch: DispatchConfig = field(default_factory=DispatchConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    source: str = "<defaults>"

    @property
    def journal_path(self) -> Path:
        return self.node.storage_dir / "journal.sqlite"

    def check_runtime(self) -> list[str]:
        """What `serve` needs of this machine beyond a well-formed file: a usable storage_dir and
        resolvable destinations. Returns warnings; raises ConfigError for a node that cannot run."""
        try:
            problem = storage_dir_problem(self.node.storage_dir)
            if problem:
                raise ConfigError(f"[node].storage_dir: {problem}")
            for i, dest in enumerate(self.destinations):
                problem = host_problem(dest.host)
                if problem:
                    raise ConfigError(f"[[destinations]][{i}].host: {problem}")
        except ConfigError as exc:
            raise ConfigError(f"{self.source}: {exc}") from None
        if not self.destinations:
            return ["no [[destinations]] configured: synthetic series are made but sent nowhere"]
        return []

    def validate(self) -> "Config":
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                names = set()
                for i, item in enumerate(value):
                    item.validate(f"[[{f.name}]][{i}]")
                    if item.name in names:
                        raise ConfigError(f"[[{f.name}]][{i}].name: duplicate name {item.name!r}")
                    names.add(item.name)
            elif hasattr(value, "validate"):
                value.validate(f"[{f.name}]")
        return self


def load_config(path: str | Path) -> Config:
    """Read and validate a TOML config; raise ConfigError naming the file, key and reason."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory; --config takes the node's TOML file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return config_from_dict(raw, source=str(path), base_dir=path.parent)


def config_from_dict(raw: dict[str, Any], source: str = "<dict>", base_dir: Path | None = None) -> Config:
    try:
        cfg = _build(Config, raw, "", base_dir)
        cfg.source = source
        return cfg.validate()
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def _build(cls: type, raw: Any, where: str, base_dir: Path | None) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'top level'}: expected a table, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls) if f.name != "source"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{_key(where, unknown[0])}: unknown key (known: {', '.join(sorted(known))})")
    kwargs = {}
    for name, value in raw.items():
        kwargs[name] = _coerce(hints[name], value, _key(where, name), base_dir)
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, where: str, base_dir: Path | None) -> Any:
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return _coerce(args[0], value, where, base_dir)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        if dataclasses.is_dataclass(item):
            return [_build(item, v, f"[[{where}]][{i}]", base_dir) for i, v in enumerate(value)]
        return [_coerce(item, v, f"{where}[{i}]", base_dir) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, f"[{where}]", base_dir)
    if hint is Path:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a path string, got {type(value).__name__}")
        p = Path(value).expanduser()
        return p if p.is_absolute() or base_dir is None else (base_dir / p)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {type(value).__name__}")
        return float(value)
    if hint in (int, bool, str):
        if type(value) is not hint:
            raise ConfigError(f"{where}: expected {hint.__name__}, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {hint}")  # pragma: no cover - programming error


def _key(where: str, name: str) -> str:
    if not where:
        return name
    return f"{where}.{name}" if where.startswith("[") else f"[{where}].{name}"


def _check_ae(value: str, where: str) -> None:
    if not AE_TITLE_RE.fullmatch(value or "") or not value.strip() or "\\" in value:
        raise ConfigError(f"{where}: AE title must be 1-16 printable characters without backslash, got {value!r}")


def _check_port(value: int, where: str) -> None:
    if not 0 <= value <= 65535:
        raise ConfigError(f"{where}: port must be 0-65535, got {value}")


def _check_positive(where: str, *names: str, obj: Any) -> None:
    for name in names:
        if getattr(obj, name) <= 0:
            raise ConfigError(f"{where}.{name}: must be > 0")


VIRTUAL_FILESYSTEMS = (Path("/proc"), Path("/sys"), Path("/dev"))


def storage_dir_problem(path: Path) -> str | None:
    """Why the node could not keep its spool and journal at `path`, or None if it can.

    The folder need not exist yet (serve creates it), but its nearest existing ancestor must be a
    folder this user may write to."""
    path = Path(path)
    if not path.is_absolute():
        path = Path.cwd() / path
    if any(path == v or v in path.parents for v in VIRTUAL_FILESYSTEMS):
        return f"{path} is on a kernel virtual file system, not storage"
    probe = path
    while not probe.exists():
        if probe.is_symlink():
            return f"{probe} is a broken symbolic link"
        probe = probe.parent
    if not probe.is_dir():
        return f"{path} is a file, not a folder" if probe == path else f"{path} cannot be created: {probe} is a file"
    if not os.access(probe, os.W_OK | os.X_OK):
        return (f"{probe} is not writable by this user" if probe == path
                else f"{path} cannot be created: {probe} is not writable by this user")
    try:
        if os.statvfs(probe).f_flag & os.ST_RDONLY:
            return f"{probe} is on a read-only file system"
    except OSError as exc:
        return f"{probe}: {exc.strerror}"
    return None


def host_problem(host: str) -> str | None:
    """None when `host` is an IP address or a name that resolves now."""
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        pass
    try:
        socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        return f"{host!r} is neither an IP address nor a resolvable host name ({getattr(exc, 'strerror', exc)})"
    return None
