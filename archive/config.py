"""Settings: defaults, then a TOML file, then ``TELEPACS_*`` environment variables.

The TOML file is the one named by ``TELEPACS_CONFIG`` (or passed explicitly);
without it, ``telepacs.toml`` in the data directory is read when present.
Example::

    data_dir = "/srv/telepacs"

    [dicom]
    ae_title = "TELEPACS"
    host = "0.0.0.0"
    port = 11112
    workers = 2                      # receiving processes (SO_REUSEPORT)
    allowed_callers = [{ ae = "CT_HUYEN_A", host = "10.1.2.3" }, { ae = "ORTHANC" }]

    [dicom.facilities]               # calling AE title -> facility code
    CT_HUYEN_A = "BV-HUYEN-A"

    [dicom.destinations]             # C-MOVE destination AE title -> "host:port"
    WORKSTATION = "10.0.0.7:104"

    [http]
    host = "127.0.0.1"
    port = 8042

    [index]
    url = "postgresql://telepacs@db/telepacs"

    [auth]
    secret_key = "..."               # signs session cookies; default: generated once into DATA_DIR/secret-key
    session_hours = 12               # a login lasts this long at most
    local_tier = "provincial"        # tier of facility LOCAL, created with the first admin on a fresh install

    [storage]
    url = "s3://ACCESS:SECRET@minio:9000/telepacs?secure=false"

    [ingest]
    duplicate_policy = "keep-newer"  # or "keep-existing", "reject"

    [forward]                        # send received instances on to a destination above
    retry_initial = 5.0              # seconds before the first retry, doubling...
    retry_max = 600.0                # ...up to this
    max_attempts = 5                 # refusals (failure status) before an instance is "failed"

    [[forward.rules]]                # omitted fields match anything
    destination = "WORKSTATION"
    calling_ae = "CT_HUYEN_A"
    modality = "CT"
"""

from __future__ import annotations

import enum
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit


class ConfigError(ValueError):
    """A setting that cannot be used, with the name of the setting."""


class DuplicatePolicy(str, enum.Enum):
    """What to do when an instance arrives again with different bytes."""

    KEEP_NEWER = "keep-newer"
    KEEP_EXISTING = "keep-existing"
    REJECT = "reject"


@dataclass(frozen=True)
class AllowedCaller:
    """A calling AE title allowed to associate, optionally only from one host."""

    ae_title: str
    host: str | None = None

    def matches(self, ae_title: str, host: str) -> bool:
        return self.ae_title == ae_title and (self.host is None or self.host == host)


@dataclass(frozen=True)
class ForwardRule:
    """Send instances received from ``calling_ae`` (any when None) of ``modality`` (any when None) to ``destination``."""

    destination: str
    calling_ae: str | None = None
    modality: str | None = None

    @property
    def key(self) -> str:
        """A stable name for the rule (its queue cursor is kept under it), in the env-var syntax."""
        conditions = [f"{name}={value}" for name, value in (("calling_ae", self.calling_ae),
                                                             ("modality", self.modality)) if value is not None]
        return f"{self.destination}:{','.join(conditions) or '*'}"

    def matches(self, source_ae: str | None, modality: str | None) -> bool:
        if self.calling_ae is not None and (source_ae or "").strip() != self.calling_ae:
            return False
        return self.modality is None or (modality or "").strip().upper() == self.modality


@dataclass(frozen=True)
class Settings:
    data_dir: Path
    ae_title: str = "TELEPACS"
    dicom_host: str = "0.0.0.0"
    dicom_port: int = 11112
    dicom_workers: int = 1
    dicom_fast_store: bool = True
    http_host: str = "127.0.0.1"
    http_port: int = 8042
    render_cache_mb: int = 128  # per web process: decoded frames and rendered images (LRU)
    public_url: str = ""  # how clients reach the web app (e.g. behind a proxy); empty: from each request's Host
    db_url: str = ""
    storage_url: str = ""
    allowed_callers: tuple[AllowedCaller, ...] = ()
    facilities: Mapping[str, str] = field(default_factory=dict)
    move_destinations: Mapping[str, tuple[str, int]] = field(default_factory=dict)
    duplicate_policy: DuplicatePolicy = DuplicatePolicy.KEEP_NEWER
    log_level: str = "INFO"
    forward_rules: tuple[ForwardRule, ...] = ()
    forward_retry_initial: float = 5.0
    forward_retry_max: float = 600.0
    forward_max_attempts: int = 5
    forward_batch_size: int = 50
    forward_poll_interval: float = 1.0
    forward_lease: float = 300.0
    # How long a consult may wait for its conclusion, by urgency (hours): past that a coordinator sees it overdue.
    consult_due_emergency_hours: float = 1.0
    consult_due_urgent_hours: float = 24.0
    consult_due_routine_hours: float = 72.0
    smtp_url: str = ""  # smtp://[user:password@]host[:port]?from=addr[&starttls=1] (smtps:// for TLS); empty: no e-mail
    secret_key: str = field(default="", repr=False)  # empty: generated once into DATA_DIR/secret-key
    session_hours: float = 12.0
    local_tier: str = "provincial"

    @property
    def spool_dir(self) -> Path:
        """Local receive spool in front of a remote object store."""
        return self.data_dir / "spool"

    @property
    def incoming_dir(self) -> Path:
        """Where instances are written while they arrive (same file system as the data dir)."""
        return self.data_dir / "incoming"

    def facility_for(self, ae_title: str | None) -> str | None:
        if ae_title is None:
            return None
        return self.facilities.get(ae_title.strip())

    def caller_allowed(self, ae_title: str, host: str) -> bool:
        if not self.allowed_callers:
            return True
        return any(c.matches(ae_title.strip(), host) for c in self.allowed_callers)


_ENV_PREFIX = "TELEPACS_"


def _bool(name: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be true or false, not {value!r}")


def _public_url(value: str) -> str:
    value = value.strip().rstrip("/")
    if value and not value.startswith(("http://", "https://")):
        raise ConfigError(f"public URL must start with http:// or https://, not {value!r}")
    return value


def _non_negative_int(name: str, value: object) -> int:
    number = _int(name, value)
    if number < 0:
        raise ConfigError(f"{name} must not be negative")
    return number


def _int(name: str, value: object) -> int:
    try:
        number = int(str(value))
    except ValueError:
        raise ConfigError(f"{name} must be an integer, not {value!r}") from None
    return number


def _port(name: str, value: object) -> int:
    port = _int(name, value)
    if not 0 <= port <= 65535:
        raise ConfigError(f"{name} must be a TCP port (0-65535), not {port}")
    return port


def _ae_title(name: str, value: object) -> str:
    ae = str(value).strip()
    if not 1 <= len(ae) <= 16 or "\\" in ae or not ae.isprintable():
        raise ConfigError(f"{name} must be 1-16 printable characters without backslash, not {value!r}")
    return ae


def _parse_callers(value: object) -> tuple[AllowedCaller, ...]:
    """From TOML (list of tables) or env (``AE@host,AE2``)."""
    callers: list[AllowedCaller] = []
    if isinstance(value, str):
        for item in filter(None, (part.strip() for part in value.split(","))):
            ae, _, host = item.partition("@")
            callers.append(AllowedCaller(_ae_title("allowed caller", ae), host or None))
        return tuple(callers)
    if not isinstance(value, list):
        raise ConfigError(f"dicom.allowed_callers must be a list, not {value!r}")
    for item in value:
        if isinstance(item, str):
            callers.append(AllowedCaller(_ae_title("allowed caller", item)))
        elif isinstance(item, dict) and "ae" in item:
            callers.append(AllowedCaller(_ae_title("allowed caller", item["ae"]), item.get("host")))
        else:
            raise ConfigError(f"dicom.allowed_callers entries need an 'ae' key, not {item!r}")
    return tuple(callers)


def _parse_facilities(value: object) -> dict[str, str]:
    """From TOML (table) or env (``AE=FACILITY,AE2=FACILITY2``)."""
    if isinstance(value, str):
        pairs = [p.split("=", 1) for p in value.split(",") if p.strip()]
        if any(len(p) != 2 for p in pairs):
            raise ConfigError(f"TELEPACS_FACILITIES must look like AE=FACILITY,AE2=FACILITY2, not {value!r}")
        return {ae.strip(): fac.strip() for ae, fac in pairs}
    if not isinstance(value, dict):
        raise ConfigError(f"dicom.facilities must be a table of AE = facility, not {value!r}")
    return {str(k).strip(): str(v) for k, v in value.items()}


def _destination(ae: object, address: object) -> tuple[str, tuple[str, int]]:
    title = _ae_title("move destination AE title", ae)
    host, sep, port = str(address).strip().rpartition(":")
    if not sep or not host.strip():
        raise ConfigError(f"move destination {title} must be host:port, not {address!r}")
    number = _port(f"move destination {title} port", port.strip())
    if number == 0:
        raise ConfigError(f"move destination {title} needs a port other than 0")
    return title, (host.strip().strip("[]"), number)


def _parse_destinations(value: object) -> dict[str, tuple[str, int]]:
    """From TOML (table of AE = "host:port") or env (``AE=host:port,AE2=host:port``)."""
    if isinstance(value, str):
        pairs = [p.split("=", 1) for p in value.split(",") if p.strip()]
        if any(len(p) != 2 for p in pairs):
            raise ConfigError(
                f"TELEPACS_MOVE_DESTINATIONS must look like AE=host:port,AE2=host:port, not {value!r}")
        return dict(_destination(ae, address) for ae, address in pairs)
    if not isinstance(value, dict):
        raise ConfigError(f"dicom.destinations must be a table of AE = \"host:port\", not {value!r}")
    return dict(_destination(ae, address) for ae, address in value.items())


def _float(name: str, value: object, minimum: float = 0.0) -> float:
    try:
        number = float(str(value))
    except ValueError:
        raise ConfigError(f"{name} must be a number, not {value!r}") from None
    if not number >= minimum:
        raise ConfigError(f"{name} must be at least {minimum}, not {number}")
    return number


def _rule(destination: object, calling_ae: object = None, modality: object = None) -> ForwardRule:
    dest = _ae_title("forward rule destination", destination)
    caller = None if calling_ae in (None, "", "*") else _ae_title("forward rule calling_ae", calling_ae)
    mod = None if modality in (None, "", "*") else str(modality).strip().upper()
    if mod is not None and not (1 <= len(mod) <= 16 and mod.replace("_", "").isalnum()):
        raise ConfigError(f"forward rule modality must be a DICOM modality code like CT, not {modality!r}")
    return ForwardRule(dest, caller, mod)


def _parse_rule_text(text: str) -> ForwardRule:
    """``DEST:calling_ae=CT1,modality=CT`` or ``DEST:*`` or ``DEST``."""
    destination, _, conditions = text.partition(":")
    fields: dict[str, str] = {}
    for item in filter(None, (c.strip() for c in conditions.split(","))):
        if item == "*":
            continue
        name, sep, value = item.partition("=")
        if not sep or name.strip() not in ("calling_ae", "modality"):
            raise ConfigError(f"TELEPACS_FORWARD_RULES: {item!r} in rule {text!r} is not calling_ae=AE or modality=MOD")
        fields[name.strip()] = value.strip()
    return _rule(destination, fields.get("calling_ae"), fields.get("modality"))


def _parse_rules(value: object) -> tuple[ForwardRule, ...]:
    """From TOML (list of tables) or env (``HUB:calling_ae=CT1,modality=CT;HUB2:*``)."""
    if isinstance(value, str):
        return tuple(_parse_rule_text(part.strip()) for part in value.split(";") if part.strip())
    if not isinstance(value, list):
        raise ConfigError(f"forward.rules must be a list of tables, not {value!r}")
    rules = []
    for item in value:
        if not isinstance(item, dict) or "destination" not in item:
            raise ConfigError(f"forward.rules entries need a 'destination' key, not {item!r}")
        unknown = set(item) - {"destination", "calling_ae", "modality"}
        if unknown:
            raise ConfigError(f"unknown setting in a forward rule: {', '.join(sorted(unknown))}")
        rules.append(_rule(item["destination"], item.get("calling_ae"), item.get("modality")))
    return tuple(rules)


def _check_rules(rules: tuple[ForwardRule, ...], destinations: Mapping[str, tuple[str, int]]) -> tuple[ForwardRule, ...]:
    for rule in rules:
        if rule.destination not in destinations:
            known = ", ".join(sorted(destinations)) or "none configured"
            raise ConfigError(f"forward rule {rule.key} names destination {rule.destination}, which is not in "
                              f"[dicom.destinations] ({known})")
    return tuple(dict.fromkeys(rules))


def _flatten_toml(doc: Mapping[str, Any]) -> dict[str, Any]:
    """Map the TOML layout onto flat setting names."""
    flat: dict[str, Any] = {}
    if "data_dir" in doc:
        flat["data_dir"] = doc["data_dir"]
    if "log_level" in doc:
        flat["log_level"] = doc["log_level"]
    sections = {
        "dicom": {"ae_title": "ae_title", "host": "dicom_host", "port": "dicom_port", "workers": "dicom_workers",
                  "fast_store": "dicom_fast_store",
                  "allowed_callers": "allowed_callers", "facilities": "facilities",
                  "destinations": "move_destinations"},
        "http": {"host": "http_host", "port": "http_port", "render_cache_mb": "render_cache_mb",
                 "public_url": "public_url"},
        "index": {"url": "db_url"},
        "auth": {"secret_key": "secret_key", "session_hours": "session_hours", "local_tier": "local_tier"},
        "storage": {"url": "storage_url"},
        "ingest": {"duplicate_policy": "duplicate_policy"},
        "forward": {"rules": "forward_rules", "retry_initial": "forward_retry_initial",
                    "retry_max": "forward_retry_max", "max_attempts": "forward_max_attempts",
                    "batch_size": "forward_batch_size", "poll_interval": "forward_poll_interval",
                    "lease": "forward_lease"},
        "mail": {"smtp_url": "smtp_url"},
        "consults": {"due_emergency_hours": "consult_due_emergency_hours",
                     "due_urgent_hours": "consult_due_urgent_hours",
                     "due_routine_hours": "consult_due_routine_hours"},
    }
    for section, names in sections.items():
        table = doc.get(section, {})
        if not isinstance(table, dict):
            raise ConfigError(f"[{section}] must be a table")
        for key, value in table.items():
            if key not in names:
                raise ConfigError(f"unknown setting [{section}] {key}")
            flat[names[key]] = value
    return flat


_ENV_NAMES = {
    "DATA_DIR": "data_dir",
    "AE_TITLE": "ae_title",
    "DICOM_HOST": "dicom_host",
    "DICOM_PORT": "dicom_port",
    "DICOM_WORKERS": "dicom_workers",
    "DICOM_FAST_STORE": "dicom_fast_store",
    "HTTP_HOST": "http_host",
    "HTTP_PORT": "http_port",
    "RENDER_CACHE_MB": "render_cache_mb",
    "PUBLIC_URL": "public_url",
    "DB_URL": "db_url",
    "STORAGE_URL": "storage_url",
    "ALLOWED_CALLERS": "allowed_callers",
    "FACILITIES": "facilities",
    "MOVE_DESTINATIONS": "move_destinations",
    "DUPLICATE_POLICY": "duplicate_policy",
    "LOG_LEVEL": "log_level",
    "FORWARD_RULES": "forward_rules",
    "FORWARD_RETRY_INITIAL": "forward_retry_initial",
    "FORWARD_RETRY_MAX": "forward_retry_max",
    "FORWARD_MAX_ATTEMPTS": "forward_max_attempts",
    "FORWARD_BATCH_SIZE": "forward_batch_size",
    "FORWARD_POLL_INTERVAL": "forward_poll_interval",
    "FORWARD_LEASE": "forward_lease",
    "CONSULT_DUE_EMERGENCY_HOURS": "consult_due_emergency_hours",
    "CONSULT_DUE_URGENT_HOURS": "consult_due_urgent_hours",
    "CONSULT_DUE_ROUTINE_HOURS": "consult_due_routine_hours",
    "SMTP_URL": "smtp_url",
    "SECRET_KEY": "secret_key",
    "SESSION_HOURS": "session_hours",
    "LOCAL_TIER": "local_tier",
}


def load_settings(
    config_file: Path | str | None = None,
    env: Mapping[str, str] | None = None,
    **overrides: Any,
) -> Settings:
    """Build :class:`Settings` from defaults, the TOML file, the environment and ``overrides`` (in that order)."""
    env = os.environ if env is None else env
    raw: dict[str, Any] = {}
    env_values = {name: env[_ENV_PREFIX + key] for key, name in _ENV_NAMES.items() if _ENV_PREFIX + key in env}

    data_dir_hint = Path(overrides.get("data_dir") or env_values.get("data_dir") or "./telepacs-data")
    path = config_file or env.get(_ENV_PREFIX + "CONFIG")
    if path is None and (data_dir_hint / "telepacs.toml").is_file():
        path = data_dir_hint / "telepacs.toml"
    if path is not None:
        try:
            with open(path, "rb") as f:
                raw.update(_flatten_toml(tomllib.load(f)))
        except FileNotFoundError:
            raise ConfigError(f"configuration file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"configuration file {path} is not valid TOML: {exc}") from None
    raw.update(env_values)
    raw.update({k: v for k, v in overrides.items() if v is not None})
    return _build(raw)


def _build(raw: Mapping[str, Any]) -> Settings:
    data_dir = Path(raw.get("data_dir", "./telepacs-data")).expanduser().resolve()
    try:
        policy = DuplicatePolicy(str(raw.get("duplicate_policy", DuplicatePolicy.KEEP_NEWER.value)))
    except ValueError:
        choices = ", ".join(p.value for p in DuplicatePolicy)
        raise ConfigError(f"duplicate_policy must be one of {choices}, not {raw['duplicate_policy']!r}") from None
    workers = _int("dicom workers", raw.get("dicom_workers", 1))
    if workers < 1:
        raise ConfigError("dicom workers must be at least 1")
    destinations = _parse_destinations(raw.get("move_destinations", {}))
    max_attempts = _int("forward max_attempts", raw.get("forward_max_attempts", 5))
    batch_size = _int("forward batch_size", raw.get("forward_batch_size", 50))
    if max_attempts < 1 or not 1 <= batch_size <= 128:
        raise ConfigError("forward max_attempts must be at least 1 and batch_size 1-128 "
                          f"(not {max_attempts} and {batch_size})")
    retry_initial = _float("forward retry_initial", raw.get("forward_retry_initial", 5.0))
    retry_max = _float("forward retry_max", raw.get("forward_retry_max", 600.0), minimum=retry_initial)
    return Settings(
        data_dir=data_dir,
        ae_title=_ae_title("AE title", raw.get("ae_title", "TELEPACS")),
        dicom_host=str(raw.get("dicom_host", "0.0.0.0")),
        dicom_port=_port("DICOM port", raw.get("dicom_port", 11112)),
        dicom_workers=workers,
        dicom_fast_store=_bool("dicom fast_store", raw.get("dicom_fast_store", True)),
        http_host=str(raw.get("http_host", "127.0.0.1")),
        http_port=_port("HTTP port", raw.get("http_port", 8042)),
        render_cache_mb=_non_negative_int("render cache MB", raw.get("render_cache_mb", 128)),
        public_url=_public_url(str(raw.get("public_url", ""))),
        db_url=str(raw.get("db_url") or f"sqlite:///{data_dir / 'index.sqlite3'}"),
        storage_url=str(raw.get("storage_url") or (data_dir / "objects").as_uri()),
        allowed_callers=_parse_callers(raw.get("allowed_callers", [])),
        facilities=_parse_facilities(raw.get("facilities", {})),
        move_destinations=destinations,
        duplicate_policy=policy,
        log_level=str(raw.get("log_level", "INFO")).upper(),
        forward_rules=_check_rules(_parse_rules(raw.get("forward_rules", [])), destinations),
        forward_retry_initial=retry_initial,
        forward_retry_max=retry_max,
        forward_max_attempts=max_attempts,
        forward_batch_size=batch_size,
        forward_poll_interval=_float("forward poll_interval", raw.get("forward_poll_interval", 1.0), minimum=0.01),
        forward_lease=_float("forward lease", raw.get("forward_lease", 300.0), minimum=1.0),
        consult_due_emergency_hours=_float("consults due_emergency_hours",
                                           raw.get("consult_due_emergency_hours", 1.0), minimum=0.01),
        consult_due_urgent_hours=_float("consults due_urgent_hours",
                                        raw.get("consult_due_urgent_hours", 24.0), minimum=0.01),
        consult_due_routine_hours=_float("consults due_routine_hours",
                                         raw.get("consult_due_routine_hours", 72.0), minimum=0.01),
        smtp_url=_smtp_url(str(raw.get("smtp_url", ""))),
        secret_key=_secret_key(str(raw.get("secret_key", ""))),
        session_hours=_float("auth session_hours", raw.get("session_hours", 12.0), minimum=0.05),
        local_tier=_tier(str(raw.get("local_tier", "provincial"))),
    )


def _smtp_url(value: str) -> str:
    if value and urlsplit(value).scheme not in ("smtp", "smtps"):
        raise ConfigError(f"mail smtp_url must start with smtp:// or smtps://, not {value!r}")
    if value and not urlsplit(value).hostname:
        raise ConfigError(f"mail smtp_url {value!r} names no host")
    return value


_TIERS = ("central", "provincial", "district", "commune")


def _tier(value: str) -> str:
    value = value.strip().lower()
    if value not in _TIERS:
        raise ConfigError(f"auth local_tier must be one of {', '.join(_TIERS)}, not {value!r}")
    return value


def _secret_key(value: str) -> str:
    if value and len(value) < 32:
        raise ConfigError("auth secret_key must have at least 32 characters (or leave it out to have one generated)")
    return value
