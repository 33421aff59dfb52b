"""Settings: defaults, then spear.toml, then SPEAR_* environment variables. Pure.

The caller reads the file and passes its text; unknown keys and bad values raise ConfigError
with the offending path, so a typo is reported at start-up and never silently ignored.
Environment: `SPEAR_SUBJECT_PREFIX`, `SPEAR_NATS_URL` (comma-separated), and any setting as
`SPEAR_<SECTION>__<KEY>` (e.g. `SPEAR_SYNC_EXECUTION__DEFAULT_TIMEOUT_MS=5000`).
"""

from __future__ import annotations

import re
import tomllib
import urllib.parse
from collections.abc import Mapping
from typing import Annotated, Any, Literal, get_origin

import msgspec

Positive = Annotated[int, msgspec.Meta(ge=1)]
NonNegative = Annotated[int, msgspec.Meta(ge=0)]
TOKEN_REGEX = r"^[A-Za-z0-9_-]{1,32}$(?!\n)"  # (?!\n): see contract.Id
Token = Annotated[str, msgspec.Meta(pattern=TOKEN_REGEX)]
TOKEN_RULE = "must be 1 to 32 letters, digits, '_' or '-'"  # messages state the rule, not the regex
URL_REGEX = r"^(https?://[^\s/?#]+[^\s]*)?$(?!\n)"
URL_RULE = "must be an http:// or https:// URL (or empty: no export)"


class _Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class NatsSettings(_Section):
    """[nats]: where NATS is, credentials and TLS, timeouts and replicas."""

    urls: list[str] = msgspec.field(default_factory=lambda: ["nats://127.0.0.1:4222"])
    user: str | None = None
    password: str | None = None
    token: str | None = None
    creds_file: str | None = None
    # TLS: a CA to verify the server by (else the system's); a client certificate and key for mTLS.
    # Any of them (or a tls:// URL) turns TLS on.
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    stream_replicas: Annotated[int, msgspec.Meta(ge=1, le=5)] = 1
    request_timeout_ms: Positive = 5000  # JetStream API calls and appends

    def __post_init__(self) -> None:
        if not self.urls:  # (probe58: nats-py then spun at 100% CPU for ever, deaf to SIGTERM)
            raise ValueError("urls: no NATS server given: name at least one (nats://host:4222)")
        for url in self.urls:  # (nats-py would fail on it later, as "NATS unavailable": probe28)
            problem = nats_url_problem(url)
            if problem:
                raise ValueError(f"urls: {shown_url(url)!r} {problem}")


NATS_SCHEMES = ("nats", "tls", "ws", "wss")


def shown_url(url: str) -> str:
    """`url` as messages show it: a password in it (`nats://user:secret@host`) or a token
    (`nats://token@host`) as `***` (probe30: a refused one was printed back, into terminals,
    logs and the health reply)."""
    scheme, found, rest = url.partition("://")  # (the first: a password may hold "://", review30)
    if not found:
        scheme, rest = "", url
    userinfo, at, host = rest.rpartition("@")
    if not at:
        return url
    user, colon, _ = userinfo.partition(":")
    return f"{scheme}{found}{user + colon if colon else ''}***@{host}"


# scheme://user:password@ : the password, up to the last "@" of the URL (a password or a user name
# may hold "/" or "@" unescaped, review32; a path with "@" after a port is hidden too: the safer mistake)
URL_PASSWORD = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^\s:/]*:)[^\s]*@")


def url_passwords_hidden(text: str, marker: str = "***") -> str:
    """`text` with the password of every URL in it (`scheme://user:password@host`) as `marker`."""
    return URL_PASSWORD.sub(lambda found: f"{found.group(1)}{marker}@", text) if "://" in text else text


def shown_urls(urls: list[str], sep: str = ", ") -> str:
    """Several URLs as messages show them (`shown_url`)."""
    return sep.join(shown_url(url) for url in urls)


def nats_url_problem(url: str) -> str:
    """Why a NATS URL cannot be used, or "" (no scheme is nats://, as nats-py takes it)."""
    scheme = url.split("://", 1)[0] if "://" in url else "nats"
    if scheme not in NATS_SCHEMES:  # (as written: nats-py looks for "nats://", so NATS:// is no scheme to it)
        return f"has scheme {scheme!r}: use {', '.join(s + '://' for s in NATS_SCHEMES)}"
    parsed = urllib.parse.urlsplit(url if "://" in url else f"nats://{url}")
    if "://" not in url and parsed.netloc.endswith(":") and (parsed.path or parsed.query or parsed.fragment):
        # Without a scheme nats-py takes `host[:port]` (`host:` too); `htp:/foo` (a scheme mistyped,
        # one slash) it took as host `htp`, retried for ever (probe67: "Name or service not known").
        return f"is neither host:port nor scheme://host:port (scheme {', '.join(NATS_SCHEMES)})"
    try:
        port = parsed.port  # (raises for a port that is not a number in range)
    except ValueError:
        return "has no valid port"
    if port == 0:
        return "has no valid port"
    if not parsed.hostname or any(c.isspace() for c in parsed.hostname):  # (a password may hold blanks)
        return "names no host"
    return ""


class SyncExecution(_Section):
    """[sync_execution]: SYNC defaults and the limit of calls in flight."""

    default_timeout_ms: Positive = 30_000
    max_concurrent_requests: Positive = 100
    enable_retries: bool = False
    max_retries: NonNegative = 0  # used only when enable_retries is true
    wait_grace_ms: NonNegative = 2_000  # how much longer than the time limit a SYNC caller waits
    # The longest a SYNC call is answered after: then DEADLINE_EXCEEDED (the execution goes on, as
    # an ASYNC one would), so no caller, gone or not, holds a SYNC slot longer than this.
    max_wait_ms: Positive = 300_000


class AsyncExecution(_Section):
    """[async_execution]: ASYNC defaults, queue limit and status retention."""

    default_timeout_ms: Positive = 3_600_000
    # The backlog lives in JetStream (on disk), not in RAM: a burst of this many small invocations
    # is tens of MB. The limit bounds the wait and the disk, and refuses work no worker serves.
    max_queue_size: Positive = 100_000
    status_retention_hours: Annotated[float, msgspec.Meta(gt=0)] = 24
    enable_retries: bool = True
    max_retries: NonNegative = 3


class RetrySettings(_Section):
    """Backoff between attempts: initial × multiplier^(attempt-1), capped, spread by ±jitter."""

    initial_backoff_ms: NonNegative = 500
    multiplier: Annotated[float, msgspec.Meta(ge=1.0)] = 2.0
    max_backoff_ms: NonNegative = 60_000
    jitter: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] = 0.2


class WorkerSettings(_Section):
    """[worker]: concurrency, acknowledgement timing, tasks and isolation."""

    concurrency: Positive = 16  # executions one worker process runs at once
    # A lost worker's invocation is redelivered this long after its last sign of life; running
    # executions send in-progress acks every third of it, so it does not bound a function's length.
    ack_wait_ms: Annotated[int, msgspec.Meta(ge=300)] = 10_000
    cancel_grace_ms: NonNegative = 5_000  # how long a cancel request waits for the function to stop
    # An invocation whose processing fails unexpectedly this many deliveries in a row (on one
    # worker) ends FAILED with POISON_MESSAGE instead of being redelivered forever.
    poison_after: Positive = 5
    tasks: list[str] = []  # the user's spear.Task objects to serve, as "pkg.module:attr"
    demo: bool = True  # serve the bundled demo task too
    # where plain functions run unless they say: "thread" (fast) or "process" (killable on timeout/cancel)
    isolation: Literal["thread", "process"] = "thread"
    # serve the tasks registered at runtime (register_task, NEW_TASK) too, picked up as they come
    serve_registered: bool = True
    # how much lower (nice, 0-19, added to spear up's own) `spear up` runs its worker processes:
    # when the CPU is short, accepting and answering calls comes before running them (cli/priority.py)
    nice: Annotated[int, msgspec.Meta(ge=0, le=19)] = 10


class TasksSettings(_Section):
    """Tasks registered at runtime (CONTRACT §8): registering runs code, so it is off by default."""

    allow_registration: bool = False
    artifact_roots: list[str] = []  # artifacts must resolve (symlinks, `..`) under one of these
    instance_idle_s: Annotated[float, msgspec.Meta(gt=0)] = 300.0  # idle task instances are retired after this
    # Whether InvokeFunction over NATS may register its task (NEW_TASK, create_if_not_exists).
    # NATS does not say who asks, so `spear up --secure` turns it off: there register_task, which
    # only the admin role may publish, registers; over HTTP the admin token decides.
    nats_invoke_registers: bool = True


DEFAULT_REDACT_KEYS = [
    "*authorization*",  # Authorization, Proxy-Authorization
    "*cookie*",  # Cookie, Set-Cookie
    "*password*",
    "*passwd*",
    "*_pass",  # DB_PASS
    "*secret*",
    "*token*",
    "*api?key*",  # X-Api-Key, OPENAI_API_KEY
    "*apikey*",
    "*_key",  # STRIPE_KEY, PRIVATE_KEY (probe34: these were shown in clear)
    "*-key",
    "*credential*",
]


class ApiSettings(_Section):
    """[api]: the HTTP listener, request limit, tokens and redaction."""

    host: str = "127.0.0.1"  # the HTTP API listens here; a non-loopback host needs tokens (or --insecure)
    http_port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 8080
    max_request_bytes: Positive = 1_048_576
    # A connection whose request headers are not complete this long after it opened (or after its
    # previous response) is closed: slow clients cannot hold connections for ever.
    header_timeout_ms: Positive = 10_000
    # And a request body not received in full this long after its headers is refused (400) and its
    # connection closed: a body dripped a byte at a time cannot hold a connection either.
    body_timeout_ms: Positive = 10_000
    # And a connection whose client takes none of what it is sent for this long, while the server
    # waits to send more, is closed: an SSE client that never reads cannot hold one for ever.
    write_timeout_ms: Positive = 30_000
    # The largest context.timeout_ms and context.max_retries a request may ask for (INVALID_ARGUMENT
    # above): an attempt limit of years, or retries for ever, is a mistake or an attack.
    timeout_ms_limit: Positive = 86_400_000
    max_retries_limit: NonNegative = 100
    max_connections: Positive = 1_000  # open HTTP connections; beyond: 503 with Retry-After, closed
    # Bearer tokens, stored hashed: lines "<name> <roles> sha256$<salt>$<digest>" (`spear token create`).
    # Any token here or in tokens_file turns authentication on, whatever the host.
    tokens: list[str] = []
    tokens_file: str | None = None
    insecure: bool = False  # serve a non-loopback host without tokens (also `--insecure`)
    # Without tokens on a loopback host, requests must name this machine in `Host` (localhost, a
    # loopback address): a DNS-rebinding page names its own. Other names to accept (a proxy's).
    allowed_hosts: list[str] = []
    # context.headers / context.environment keys whose values are hidden on every read (glob patterns,
    # case-insensitive); the worker still receives the real values.
    redact_keys: list[str] = msgspec.field(default_factory=lambda: list(DEFAULT_REDACT_KEYS))
    # SYNC calls of `inline=True` functions of the tasks `spear up` loads run in the gateway itself
    # (spear.service.inline): one chain of appends instead of a trip through a worker.
    inline_sync: bool = True


class TelemetrySettings(_Section):
    """Traces and metrics export. Metrics are always at `GET /metrics`; traces are kept only when
    an exporter is configured, otherwise spans are created unsampled (ids for `traceparent`, no
    recording)."""

    service_name: Annotated[str, msgspec.Meta(min_length=1)] = "spear"
    # e.g. http://localhost:4318: traces and metrics over OTLP/HTTP (checked as a URL at start-up)
    otlp_endpoint: Annotated[str, msgspec.Meta(pattern=URL_REGEX)] = ""
    sampling_ratio: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] = 1.0  # of new traces; parents decide theirs
    traces_file: str = ""  # spans as JSON lines, one file per process (debugging, tests)
    metrics_port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 0  # /metrics for components without HTTP
    metrics_export_interval_ms: Positive = 15_000  # OTLP metrics push interval


class ProjectionSettings(_Section):
    """The projection: how long it may hold an execution's events to fold them into one write."""

    # An event waits at most this long before its state is written (sooner once the batch is
    # full); 0: write what is waiting at once.
    linger_ms: Annotated[int, msgspec.Meta(ge=0, le=1000)] = 20
    stats_interval_ms: Annotated[int, msgspec.Meta(ge=0, le=60_000)] = 500  # function stats written at most this often
    # how much lower (nice, 0-19, added to spear up's own) `spear up` runs its projection (as [worker] nice)
    nice: Annotated[int, msgspec.Meta(ge=0, le=19)] = 10


class Settings(_Section):
    """All of spear's configuration (spear.toml, SPEAR_* environment, flags)."""

    subject_prefix: Token = "spear"
    data_dir: str = ".spear"
    nats: NatsSettings = msgspec.field(default_factory=NatsSettings)
    sync_execution: SyncExecution = msgspec.field(default_factory=SyncExecution)
    async_execution: AsyncExecution = msgspec.field(default_factory=AsyncExecution)
    retry: RetrySettings = msgspec.field(default_factory=RetrySettings)
    worker: WorkerSettings = msgspec.field(default_factory=WorkerSettings)
    tasks: TasksSettings = msgspec.field(default_factory=TasksSettings)
    api: ApiSettings = msgspec.field(default_factory=ApiSettings)
    telemetry: TelemetrySettings = msgspec.field(default_factory=TelemetrySettings)
    projection: ProjectionSettings = msgspec.field(default_factory=ProjectionSettings)


class ConfigError(ValueError):
    """Configuration that cannot be used; the message names the key and its source."""

    pass


# A stopping worker lets running attempts finish for this long before it hands them back; a
# stopping gateway keeps its SYNC callers waiting as long, for those attempts' results.
STOP_GRACE_S = 10.0

ENV_PREFIX = "SPEAR_"
CLI_VARIABLES = ("config", "log_level", "log_format")  # SPEAR_CONFIG, SPEAR_LOG_*: read by the CLI, not settings


def load_settings(
    toml_text: str | None = None, env: Mapping[str, str] | None = None, source: str = "spear.toml"
) -> Settings:
    """Merge defaults, the TOML document (`source` names it in errors) and the environment into
    validated Settings. Every error names where the bad value came from: the file and key, or the
    environment variable. `SPEAR_<SECTION>__<KEY>` must name a real setting; other `SPEAR_*`
    variables that name no setting (`SPEAR_HOME`, say) are not ours and are ignored."""
    raw: dict[str, Any] = {}
    if toml_text:
        try:
            raw = tomllib.loads(toml_text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{source}: {exc}") from None
    settings = _validated(raw, source)
    for key, value in sorted((env or {}).items()):
        if key.startswith(ENV_PREFIX) and _set_from_env(raw, key, value):
            # validated one variable at a time, so an error names the variable that caused it
            settings = _validated(raw, f"environment variable {key}={_shown_env(key, value)!r}")
    return settings


def _shown_env(key: str, value: str) -> str:
    """A variable's value as an error shows it: NATS URLs with their passwords masked (review30:
    `SPEAR_NATS_URL`, which spear up hands its workers, was printed whole), secrets not at all."""
    name = key.lower()
    if any(word in name for word in ("password", "secret", "token")):
        return "***"
    if name.startswith("spear_nats"):
        return ",".join(shown_url(part) for part in value.split(","))
    return url_passwords_hidden(value)  # (review31: one in an OTLP endpoint was printed)


def _validated(raw: dict[str, Any], source: str) -> Settings:
    try:
        return msgspec.convert(raw, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{source}: {_explain(str(exc))}") from None


def _explain(message: str) -> str:
    """msgspec's "Object contains unknown field `x` - at `$.nats`" as "unknown key nats.x (the keys
    of [nats] are: ...)", and "Expected ... - at `$.a.b`" as "a.b: Expected ..."."""
    what, _, where = message.partition(" - at `$")
    path = where.rstrip("`").lstrip(".")
    if what.startswith("Object contains unknown field `"):
        key = what.split("`")[1]
        section = _SECTIONS.get(path)
        if section is None and not path:
            known = ", ".join(f.name for f in msgspec.structs.fields(Settings))
            return f"unknown key {key} (known keys: {known})"
        known = ", ".join(f.name for f in msgspec.structs.fields(section)) if section else ""
        return f"unknown key {path}.{key}" + (f" (the keys of [{path}] are: {known})" if known else "")
    pattern = re.fullmatch(r"Expected `str` matching regex '(.*)'", what)
    rules = {TOKEN_REGEX: TOKEN_RULE, URL_REGEX: URL_RULE}
    if pattern and pattern.group(1).replace("\\\\", "\\") in rules:  # msgspec shows `\` doubled
        what = rules[pattern.group(1).replace("\\\\", "\\")]
    return f"{path}: {what}" if path else what


def _sections() -> dict[str, type[msgspec.Struct]]:
    return {
        f.name: f.type
        for f in msgspec.structs.fields(Settings)
        if isinstance(f.type, type) and issubclass(f.type, msgspec.Struct)
    }


_SECTIONS = _sections()


def _set_from_env(raw: dict[str, Any], key: str, value: str) -> bool:
    """Put one SPEAR_* variable into `raw`; False when it names no setting (and is ignored)."""
    name = key[len(ENV_PREFIX) :].lower()
    if name == "nats_url":
        raw.setdefault("nats", {})["urls"] = _split(value)
        return True
    section, sep, field = name.partition("__")
    if not sep:
        if name in _SECTIONS or name in CLI_VARIABLES or name not in Settings.__struct_fields__:
            return False  # not a setting of ours (SPEAR_HOME, SPEAR_BIN, ...)
        raw[name] = value
        return True
    struct = _SECTIONS.get(section)
    if struct is None:
        raise ConfigError(
            f"environment variable {key}: spear has no settings section [{section}] (sections: {', '.join(_SECTIONS)})"
        )
    fields = {f.name: f for f in msgspec.structs.fields(struct)}
    if field not in fields:
        raise ConfigError(
            f"environment variable {key}: [{section}] has no key {field!r} (its keys: {', '.join(fields)})"
        )
    target = raw.setdefault(section, {})
    target[field] = _split(value) if get_origin(fields[field].type) is list else value
    return True


def meant_settings(env: Mapping[str, str]) -> list[tuple[str, str]]:
    """`SPEAR_*` variables written with one underscore where a setting has two
    (`SPEAR_WORKER_CONCURRENCY`, meant as `SPEAR_WORKER__CONCURRENCY`): ignored, as every variable
    that names no setting is, and so worth a word (probe36). Each with the name it looks meant as."""
    found = []
    for key in sorted(env):
        name = key[len(ENV_PREFIX) :].lower() if key.startswith(ENV_PREFIX) else ""
        if not name or "__" in name:
            continue
        for section, struct in _SECTIONS.items():
            field = name.removeprefix(section + "_")
            if field != name and field in struct.__struct_fields__:
                found.append((key, f"{ENV_PREFIX}{section.upper()}__{field.upper()}"))
    return found


def _split(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def with_overrides(settings: Settings, **sections: dict[str, Any]) -> Settings:
    """A copy of settings with some section fields replaced (used by CLI flags and tests)."""
    raw = msgspec.to_builtins(settings)
    for name, fields in sections.items():
        if isinstance(raw.get(name), dict):
            raw[name].update(fields)
        else:
            raw[name] = fields
    try:
        return msgspec.convert(raw, Settings)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"configuration: {_explain(str(exc))}") from None
