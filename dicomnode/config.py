"""node.toml -> a typed, validated configuration (pydantic).

Every problem is reported as `FILE: [section].key: reason`, and unknown keys are errors, so a
typo in a hospital's config fails at start instead of silently falling back to a default. Types
are strict: a port written as "104" is an error, not a guess. Each stage receives its own section.
"""

from __future__ import annotations

import enum
import ipaddress
import os
import re
import socket
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic.functional_validators import BeforeValidator

AE_TITLE_RE = re.compile(r"^[\x20-\x7e]{1,16}$")
DEVICE_RE = re.compile(r"auto|cpu|cuda(:\d+)?")


class LatePolicy(enum.StrEnum):
    """An instance for a series whose job has completed: a new job generation, or kept without one."""

    REPROCESS = "reprocess"
    IGNORE = "ignore"


class ConfigError(ValueError):
    """A configuration problem; the message names the file, the key and the reason."""


def _path(value: Any, info: ValidationInfo) -> Any:
    """A path string; relative paths are relative to the config file's folder."""
    if not isinstance(value, (str, Path)):
        raise ValueError(f"expected a path string, got {type(value).__name__}")
    p = Path(value).expanduser()
    base = (info.context or {}).get("base_dir")
    return p if p.is_absolute() or base is None else Path(base) / p


def _ae_title(value: Any) -> Any:
    if isinstance(value, str) and (not AE_TITLE_RE.fullmatch(value) or not value.strip() or "\\" in value):
        raise ValueError(f"AE title must be 1-16 printable characters without backslash, got {value!r}")
    return value


FilePath = Annotated[Path, BeforeValidator(_path)]
AETitle = Annotated[str, BeforeValidator(_ae_title)]
Port = Annotated[int, Field(ge=0, le=65535)]
Positive = Annotated[float, Field(gt=0)]


class Section(BaseModel):
    """A config table: strict types, no unknown keys, assignments validated too."""

    model_config = ConfigDict(strict=True, extra="forbid", validate_assignment=True)


class NodeConfig(Section):
    ae_title: AETitle = "DICOMNODE"
    host: str = "127.0.0.1"
    port: Port = 11112
    storage_dir: FilePath = Path("/var/lib/dicomnode")
    allowed_calling_aets: list[AETitle] = []  # empty: any caller
    allowed_hosts: list[str] = []  # IPs or CIDR networks; empty: any
    require_called_aet: bool = True
    max_associations: Annotated[int, Field(gt=0)] = 10
    request_timeout: Positive = 5.0  # for a new connection's A-ASSOCIATE-RQ (and TLS handshake) to arrive
    max_pending_per_host: Annotated[int, Field(gt=0)] = 16  # connections of one host still before their request
    acse_timeout: Positive = 30.0
    dimse_timeout: Positive = 60.0
    network_timeout: Positive = 120.0
    min_free_disk_mb: Annotated[int, Field(ge=0)] = 1024  # below this, C-STORE answers 0xA700 (out of resources)
    max_pdu: Annotated[int, Field(ge=0)] = 0  # 0: unlimited

    @field_validator("allowed_hosts")
    @classmethod
    def _networks(cls, hosts: list[str]) -> list[str]:
        for i, host in enumerate(hosts):
            try:
                ipaddress.ip_network(host, strict=False)
            except ValueError as exc:
                raise ValueError(f"[{i}]: {exc}") from None
        return hosts


class TLSConfig(Section):
    enabled: bool = False
    cert_file: FilePath | None = None
    key_file: FilePath | None = None
    ca_file: FilePath | None = None  # when set, clients must present a certificate signed by it

    @model_validator(mode="after")
    def _files(self) -> "TLSConfig":
        if self.enabled:
            for name in ("cert_file", "key_file"):
                if getattr(self, name) is None:
                    raise _KeyError(name, "required when TLS is enabled")
            for name in ("cert_file", "key_file", "ca_file"):
                path = getattr(self, name)
                if path is not None and not path.is_file():
                    raise _KeyError(name, f"no such file: {path}")
        return self


class DicomwebConfig(Section):
    """The STOW-RS service: DICOMweb Store on its own port, beside the C-STORE SCP."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: Port = 11180
    path: Annotated[str, Field(pattern=r"^(/[A-Za-z0-9._~-]+)*$")] = "/dicom-web"  # STOW-RS at PATH/studies
    tokens_file: FilePath | None = None  # bearer tokens, one a line ("NAME TOKEN" or "TOKEN"); read at each request
    tls: bool = False  # HTTPS with [tls] cert_file and key_file; with [tls] ca_file, a client certificate is required
    max_request_mb: Annotated[int, Field(ge=1, le=4096)] = 512  # a larger request is refused (413), unread
    max_concurrent_requests: Annotated[int, Field(ge=1, le=64)] = 4  # more at once are answered 503
    request_timeout: Positive = 60.0  # seconds a request's body may stall

    @field_validator("tokens_file")
    @classmethod
    def _exists(cls, path: Path | None) -> Path | None:
        if path is not None and not path.is_file():
            raise ValueError(f"no such file: {path}")
        return path


class SeriesConfig(Section):
    quiet_seconds: Positive = 10.0  # complete after this long without a new instance
    # a series that declares its size completes this long after its last instance
    settle_seconds: Annotated[float, Field(ge=0, le=1.0)] = 0.5
    late_instance_policy: Annotated[LatePolicy, Field(strict=False)] = LatePolicy.REPROCESS


class RulesConfig(Section):
    """Declarative selection; every criterion must hold for a series to be processed."""

    modalities: list[str] = ["MR"]
    # MR Image Storage, Enhanced MR Image Storage, Legacy Converted Enhanced MR Image Storage (their
    # frames are read as slices: dicomnode.frames).
    sop_classes: list[str] = ["1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.4.1", "1.2.840.10008.5.1.4.1.1.4.4"]
    orientation: Literal["sagittal", "axial", "coronal", "any"] = "sagittal"
    max_obliquity_deg: Annotated[float, Field(ge=0, le=90)] = 25.0
    description_include: str = ""  # optional regex the SeriesDescription must match
    description_exclude: str = r"(?i)(\bt1|t1w|t1_|_t1|pd\b|pdw|dwi|diff|adc|\btrace|localizer|scout|survey|mip|dixon_(w|in|opp))"
    require_t2: bool = True
    require_fat_suppression: bool = True
    accept_stir: bool = False
    min_slices: Annotated[int, Field(ge=1)] = 8
    max_slices: Annotated[int, Field(ge=1)] = 64
    require_consistent_geometry: bool = True

    @field_validator("description_include", "description_exclude")
    @classmethod
    def _regex(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"invalid regular expression: {exc}") from None
        return value

    @model_validator(mode="after")
    def _slice_range(self) -> "RulesConfig":
        if self.max_slices < self.min_slices:
            raise _KeyError("max_slices", f"must be >= min_slices ({self.min_slices})")
        return self


class DestinationAuth(enum.StrEnum):
    """How a DICOMweb destination is authenticated: the secret is read from `credentials_file`."""

    NONE = "none"
    BASIC = "basic"  # the file holds user:password
    BEARER = "bearer"  # the file holds the token


class DestinationConfig(Section):
    """Where results go: a DICOM AE (`ae_title`, `host`, `port`: C-STORE) or a DICOMweb service
    (`url`: STOW-RS to URL/studies)."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    ae_title: AETitle | None = None
    host: Annotated[str, Field(min_length=1)] | None = None
    port: Port = 104
    tls: bool = False
    url: str | None = None  # DICOMweb base URL, e.g. https://pacs.example/dicom-web
    auth: Annotated[DestinationAuth, Field(strict=False)] = DestinationAuth.NONE
    credentials_file: FilePath | None = None  # read at each attempt, so a rotated secret needs no restart
    instances_per_request: Annotated[int, Field(ge=1, le=1000)] = 50  # STOW-RS: instances in one request
    ca_file: FilePath | None = None
    max_associations: Annotated[int, Field(ge=1, le=16)] = 2  # deliveries (one job each) in flight at once
    # Seconds, chosen so a dead or silent peer is noticed in seconds: the TCP connection, the
    # A-ASSOCIATE-AC (or A-RELEASE-RP), each C-STORE response, and any PDU at all. DICOMweb uses
    # connect_timeout for the connection and network_timeout for each read of the response.
    connect_timeout: Positive = 5.0
    acse_timeout: Positive = 10.0
    dimse_timeout: Positive = 30.0
    network_timeout: Positive = 60.0

    @field_validator("ca_file", "credentials_file")
    @classmethod
    def _exists(cls, path: Path | None) -> Path | None:
        if path is not None and not path.is_file():
            raise ValueError(f"no such file: {path}")
        return path

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is None:
            return value
        from urllib.parse import urlsplit

        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 - raises on a port that is not a number
        except ValueError as exc:
            raise ValueError(f"not a URL: {exc}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"must be an http:// or https:// URL with a host, got {value!r}")
        if parts.username is not None or parts.password is not None:
            raise ValueError("must not hold credentials: put them in credentials_file")
        if parts.query or parts.fragment:
            raise ValueError(f"must be a base URL without query or fragment, got {value!r}")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _kind(self) -> "DestinationConfig":
        if self.url is not None:
            for key in ("ae_title", "host"):
                if getattr(self, key) is not None:
                    raise _KeyError(key, "not used with url (a DICOMweb destination): give one or the other")
            if self.tls:
                raise _KeyError("tls", "not used with url: an https:// URL is TLS")
            if self.auth != DestinationAuth.NONE and self.credentials_file is None:
                raise _KeyError("credentials_file", f"required with auth = {self.auth.value!r}")
            return self
        for key in ("ae_title", "host"):
            if getattr(self, key) is None:
                raise _KeyError(key, "missing")
        if self.auth != DestinationAuth.NONE or self.credentials_file is not None:
            raise _KeyError("auth" if self.auth != DestinationAuth.NONE else "credentials_file",
                            "only for a DICOMweb destination (url)")
        return self

    @property
    def dicomweb(self) -> bool:
        return self.url is not None

    @property
    def address(self) -> str:
        """Where it is, for logs and `config check` (no secret: a URL never holds one)."""
        return self.url if self.url is not None else f"{self.ae_title}@{self.host}:{self.port}"

    @property
    def hostname(self) -> str:
        if self.url is not None:
            from urllib.parse import urlsplit

            return urlsplit(self.url).hostname or ""
        return self.host or ""


class DispatchConfig(Section):
    calling_ae_title: str = ""  # default: the node's own AE title
    backoff_initial_seconds: Positive = 30.0
    backoff_max_seconds: Positive = 3600.0
    give_up_after_seconds: Positive = 86400.0  # then the delivery goes to the dead letter

    @field_validator("calling_ae_title")
    @classmethod
    def _ae(cls, value: str) -> str:
        return _ae_title(value) if value else value

    @model_validator(mode="after")
    def _backoff(self) -> "DispatchConfig":
        if self.backoff_max_seconds < self.backoff_initial_seconds:
            raise _KeyError("backoff_max_seconds", "must be >= backoff_initial_seconds")
        return self


class RetentionConfig(Section):
    keep_hours: Positive = 72.0  # processed series and spool files older than this are removed
    check_interval_minutes: Positive = 30.0


class MetricsConfig(Section):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: Port = 9108


class InferenceConfig(Section):
    model: str = "default"  # a folder under models/ or a path to a model folder; "none": no synthesis
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    sampler: Literal["fast", "ddpm"] = "fast"
    # Unset (the default): the values the model card was validated with. Set them only to
    # override the card; they change the pixels, so they also change the output UIDs.
    steps: Annotated[int, Field(ge=1)] | None = None  # denoiser evaluations per sample (fast samplers)
    warm_start: Annotated[float, Field(gt=0, le=1.0)] | None = None  # noise level refined from (1.0 = pure noise)
    samples: Annotated[int, Field(ge=1)] | None = None  # samples averaged per slice (their SD is the uncertainty)
    seed: int = 0
    batch_size: Annotated[int, Field(ge=1)] = 1  # slices per forward pass; the K samples of a slice already batch
    timeout_seconds: Positive = 600.0  # watchdog per job: the inference process is killed and restarted
    crash_retries: Annotated[int, Field(ge=0)] = 1  # a job whose inference process dies is retried this often
    start_timeout_seconds: Positive = 600.0  # for the inference process to load the model
    banner: bool = True
    # Where inference runs: "local" (the node's own inference process) or "ray" (model actors on a
    # Ray cluster; needs `pip install 'dicomnode[ray]'`, docs/user-guide/ray-cluster.md).
    backend: Literal["local", "ray"] = "local"
    ray_address: str = "local"  # "local": a one-machine Ray started by the node; else "HOST:6379" or "ray://HOST:10001"
    ray_actors: Annotated[int, Field(ge=1, le=256)] = 1  # model actors = jobs in flight at once
    ray_cpus_per_actor: Annotated[float, Field(gt=0)] = 1.0
    ray_gpus_per_actor: Annotated[float, Field(ge=0)] | None = None  # unset: 1 if the cluster has GPUs, else 0

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not DEVICE_RE.fullmatch(value):
            raise ValueError(f"must be auto, cpu, cuda or cuda:N, got {value!r}")
        return value


class OutputConfig(Section):
    uncertainty: bool = False  # also send the K-sample SD map as its own synthetic series


class SafetyAction(enum.StrEnum):
    """What the node does with a series the gate finds outside the model's training data."""

    REFUSE = "refuse"  # no synthetic series: the job ends 'ignored' with the score and the reason
    FLAG = "flag"  # the series is made, marked INPUT OUTSIDE TRAINING DATA (description and banner)
    OFF = "off"  # not checked


class SafetyConfig(Section):
    """The input gate and the output check (dicomnode.infer.gate), calibrated with the model."""

    input: Annotated[SafetyAction, Field(strict=False)] = SafetyAction.REFUSE
    output: Annotated[SafetyAction, Field(strict=False)] = SafetyAction.REFUSE


class LoggingConfig(Section):
    level: str = "INFO"  # logs never carry patient names or IDs
    audit_file: FilePath | None = None  # also write the audit trail as JSON lines here (default: journal only)

    @field_validator("level")
    @classmethod
    def _level(cls, value: str) -> str:
        if value.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ValueError("must be DEBUG, INFO, WARNING or ERROR")
        return value


class Config(Section):
    node: NodeConfig = NodeConfig()
    tls: TLSConfig = TLSConfig()
    dicomweb: DicomwebConfig = DicomwebConfig()
    series: SeriesConfig = SeriesConfig()
    rules: RulesConfig = RulesConfig()
    destinations: list[DestinationConfig] = []
    dispatch: DispatchConfig = DispatchConfig()
    retention: RetentionConfig = RetentionConfig()
    metrics: MetricsConfig = MetricsConfig()
    inference: InferenceConfig = InferenceConfig()
    output: OutputConfig = OutputConfig()
    safety: SafetyConfig = SafetyConfig()
    logging: LoggingConfig = LoggingConfig()
    source: str = Field("<defaults>", exclude=True)

    @field_validator("destinations")
    @classmethod
    def _unique(cls, destinations: list[DestinationConfig]) -> list[DestinationConfig]:
        seen: set[str] = set()
        for i, d in enumerate(destinations):
            if d.name in seen:
                raise ValueError(f"[{i}].name: duplicate name {d.name!r}")
            seen.add(d.name)
        return destinations

    @model_validator(mode="after")
    def _dicomweb(self) -> "Config":
        web, tls = self.dicomweb, self.tls
        if web.tls and (tls.cert_file is None or tls.key_file is None):
            raise _SectionKeyError("dicomweb", "tls", "needs [tls] cert_file and key_file")
        if web.enabled and web.tokens_file is None and not (web.tls and tls.ca_file is not None):
            raise _SectionKeyError("dicomweb", "tokens_file", "required: the STOW-RS service needs bearer tokens, "
                                   "or tls = true with a [tls] ca_file for client certificates")
        return self

    @property
    def journal_path(self) -> Path:
        return self.node.storage_dir / "journal.sqlite"

    def check_runtime(self) -> list[str]:
        """What `serve` needs of this machine beyond a well-formed file: a usable storage_dir and
        resolvable destinations. Returns warnings; raises ConfigError for a node that cannot run."""
        problem = storage_dir_problem(self.node.storage_dir)
        if problem:
            raise ConfigError(f"{self.source}: [node].storage_dir: {problem}")
        for i, dest in enumerate(self.destinations):
            problem = host_problem(dest.hostname)
            if problem:
                raise ConfigError(f"{self.source}: [[destinations]][{i}].{'url' if dest.dicomweb else 'host'}: {problem}")
        if self.inference.backend == "ray":
            import importlib.util

            if importlib.util.find_spec("ray") is None:
                raise ConfigError(f"{self.source}: [inference].backend: 'ray' needs Ray on this machine: "
                                  "pip install 'dicomnode[ray]'")
        if not self.destinations:
            return ["no [[destinations]] configured: synthetic series are made but sent nowhere"]
        return [f"[[destinations]][{i}].credentials_file: {d.credentials_file} can be read by other users "
                f"(chmod 600 it)" for i, d in enumerate(self.destinations)
                if d.credentials_file is not None and d.credentials_file.stat().st_mode & 0o077]


class _KeyError(ValueError):
    """Raised by a cross-field check to blame one key of its table."""

    def __init__(self, key: str, reason: str):
        super().__init__(f"{key}: {reason}")


class _SectionKeyError(ValueError):
    """Raised by a check across sections to blame one key of one section."""

    def __init__(self, section: str, key: str, reason: str):
        super().__init__(f"[{section}].{key}: {reason}")


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
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: top level: expected a table, got {type(raw).__name__}")
    try:
        cfg = Config.model_validate(raw, context={"base_dir": base_dir})
    except ValidationError as exc:  # every problem, one line each: a hospital fixes its file once
        raise ConfigError("\n".join(f"{source}: {_describe(dict(error))}" for error in exc.errors())) from None
    cfg.source = source
    return cfg


def _describe(error: dict) -> str:
    """One pydantic error -> `[section].key: reason`, in the words the old hand-written checks used."""
    loc = [p for p in error["loc"] if not (isinstance(p, str) and (p.startswith("function-") or p in
                                                                     ("constrained-int", "constrained-float")))]
    kind, ctx, value = error["type"], error.get("ctx") or {}, error.get("input")
    message = str(error["msg"]).removeprefix("Value error, ")
    if kind == "value_error" and message.startswith("[") and "]" in message:  # a list item: "[i]: reason"
        index, message = message.split(": ", 1)
        loc = [*loc, index]
    elif kind == "value_error" and isinstance(ctx.get("error"), _KeyError):
        key, message = message.split(": ", 1)
        loc = [*loc, key]
    where = _where(loc)
    if kind == "extra_forbidden":
        known = _known_keys(error["loc"][:-1])
        return f"{where}: unknown key (known: {', '.join(known)})"
    if kind == "missing":
        return f"{where}: missing"
    if kind in ("model_type", "dict_type") and len(loc) == 1:
        return f"[{loc[0]}]: expected a table, got {type(value).__name__} {value!r}"
    if kind.endswith("_type") or kind in ("int_from_float", "model_type", "list_type"):
        expected = {"int_type": "int", "bool_type": "bool", "string_type": "str", "float_type": "a number",
                    "list_type": "a list", "model_type": "a table", "dict_type": "a table"}.get(kind, kind[:-5])
        return f"{where}: expected {expected}, got {type(value).__name__} {value!r}"
    if kind in ("literal_error", "enum"):
        return f"{where}: must be one of {ctx.get('expected')}, got {value!r}"
    bounds = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
    if kind in bounds:
        limit = next(iter(ctx.values()))
        return f"{where}: must be {bounds[kind]} {limit}, got {value!r}"
    if kind == "string_pattern_mismatch":
        return f"{where}: {value!r} does not match {ctx.get('pattern')}"
    if kind == "string_too_short":
        return f"{where}: missing"
    return f"{where}: {message}"


def _where(loc: list) -> str:
    """('node', 'port') -> [node].port; ('destinations', 0, 'host') -> [[destinations]][0].host."""
    if not loc:
        return "top level"
    head, rest = loc[0], list(loc[1:])
    if head == "destinations" and rest and isinstance(rest[0], int):
        out = f"[[destinations]][{rest.pop(0)}]"
    elif head == "destinations" and rest and str(rest[0]).startswith("["):
        out = f"[[destinations]]{rest.pop(0)}"
    elif rest:
        out = f"[{head}]"
    else:
        return str(head)
    for part in rest:
        out += f"[{part}]" if isinstance(part, int) else (part if str(part).startswith("[") else f".{part}")
    return out


def _known_keys(loc: tuple) -> list[str]:
    model: Any = Config
    for part in loc:
        if isinstance(part, int):
            continue
        annotation = model.model_fields[part].annotation
        model = getattr(annotation, "__args__", (annotation,))[0] if part == "destinations" else annotation
    return sorted(k for k in model.model_fields if k != "source")


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
