import pytest
from nats.aio.client import Client as NatsClient

from spear import Client
from spear.core.config import ConfigError, load_settings, nats_url_problem, with_overrides


def test_defaults_are_the_seed_values():
    settings = load_settings()
    assert settings.sync_execution.default_timeout_ms == 30000
    assert settings.sync_execution.max_concurrent_requests == 100
    assert settings.sync_execution.enable_retries is False
    assert settings.async_execution.default_timeout_ms == 3600000
    assert settings.async_execution.max_queue_size == 100_000
    assert settings.async_execution.status_retention_hours == 24
    assert settings.async_execution.max_retries == 3
    assert settings.subject_prefix == "spear"


def test_toml_then_environment_override():
    toml = '[sync_execution]\ndefault_timeout_ms = 5000\n[nats]\nurls = ["nats://a:4222"]\n'
    env = {
        "SPEAR_SYNC_EXECUTION__MAX_CONCURRENT_REQUESTS": "7",
        "SPEAR_SUBJECT_PREFIX": "acme",
        "SPEAR_NATS_URL": "nats://b:4222, nats://c:4222",
        "HOME": "/ignored",
    }
    settings = load_settings(toml, env)
    assert settings.sync_execution.default_timeout_ms == 5000
    assert settings.sync_execution.max_concurrent_requests == 7
    assert settings.subject_prefix == "acme"
    assert settings.nats.urls == ["nats://b:4222", "nats://c:4222"]


@pytest.mark.parametrize(
    "toml, env, fragment",
    [
        ("[sync_execution]\ndefault_timout_ms = 5\n", {}, "default_timout_ms"),
        ("[sync_execution]\ndefault_timeout_ms = -5\n", {}, "default_timeout_ms"),
        ("[nonsense]\nx = 1\n", {}, "nonsense"),
        ("", {"SPEAR_ASYNC_EXECUTION__MAX_QUEUE_SIZE": "lots"}, "max_queue_size"),
        ("", {"SPEAR_SUBJECT_PREFIX": "a.b"}, "subject_prefix"),
        ("not = [toml", {}, "spear.toml"),
    ],
)
def test_unknown_keys_and_bad_values_are_reported(toml, env, fragment):
    with pytest.raises(ConfigError) as err:
        load_settings(toml, env)
    assert fragment in str(err.value)


def test_the_example_file_is_valid_and_says_the_defaults():
    from pathlib import Path

    from spear.core.config import Settings

    example = (Path(__file__).parent.parent / "spear.toml.example").read_text()
    assert load_settings(example) == Settings()


def test_the_example_file_lists_every_key():
    """It says it does (probe30: `[tasks] nats_invoke_registers` was missing); a key may be
    listed commented out (one with no default value to show)."""
    import re
    from pathlib import Path

    import msgspec

    from spear.core.config import Settings

    example = (Path(__file__).parent.parent / "spear.toml.example").read_text()
    sections = dict(re.findall(r"^\[(\w+)\][^\n]*\n(.*?)(?=^\[|\Z)", example, re.M | re.S))
    sections[""] = example.split("\n[", 1)[0]
    missing = []
    for field in msgspec.structs.fields(Settings):
        if isinstance(field.default_factory, type) and issubclass(field.default_factory, msgspec.Struct):
            keys, text = [f.name for f in msgspec.structs.fields(field.default_factory)], sections.get(field.name, "")
            missing += [f"[{field.name}] {key}" for key in keys if not re.search(rf"^(# )?{key} =", text, re.M)]
        elif not re.search(rf"^{field.name} =", sections[""], re.M):
            missing.append(field.name)
    assert missing == []


def test_variables_that_name_no_setting_are_ignored():
    env = {"SPEAR_HOME": "/x", "SPEAR_BIN": "/usr/bin/spear", "SPEAR_NATS": "x", "SPEAR_CONFIG": "a.toml"}
    assert load_settings(None, env) == load_settings()


@pytest.mark.parametrize(
    "env, fragments",
    [
        (
            {"SPEAR_NATS__URL": "nats://a:1"},
            ["environment variable SPEAR_NATS__URL", "[nats] has no key 'url'", "urls"],
        ),
        ({"SPEAR_NOPE__X": "1"}, ["environment variable SPEAR_NOPE__X", "no settings section [nope]"]),
        ({"SPEAR_WORKER__CONCURRENCY": "0"}, ["environment variable SPEAR_WORKER__CONCURRENCY='0'", "concurrency"]),
        (  # the rule, not the regex
            {"SPEAR_SUBJECT_PREFIX": "a.b"},
            ["SPEAR_SUBJECT_PREFIX='a.b'", "subject_prefix: must be 1 to 32 letters, digits, '_' or '-'"],
        ),
        *(  # checked at start-up, not at the first export
            (
                {"SPEAR_TELEMETRY__OTLP_ENDPOINT": bad},
                ["SPEAR_TELEMETRY__OTLP_ENDPOINT=", "telemetry.otlp_endpoint: must be an http:// or https:// URL"],
            )
            for bad in ("notaurl", "localhost:4318", "http://", "http://a b", "http://a\n", "ftp://a")
        ),
    ],
)
def test_an_environment_error_names_the_variable(env, fragments):
    with pytest.raises(ConfigError) as err:
        load_settings(None, {"SPEAR_HOME": "/x", **env})
    for fragment in fragments:
        assert fragment in str(err.value)


def test_an_otlp_endpoint_is_a_url_or_nothing():
    for good in ("", "http://localhost:4318", "https://collector.example:4318/base"):
        assert load_settings(None, {"SPEAR_TELEMETRY__OTLP_ENDPOINT": good}).telemetry.otlp_endpoint == good


def test_a_file_error_names_the_file_and_key():
    with pytest.raises(ConfigError) as err:
        load_settings("[nats]\nurl = 'x'\n", {}, source="/etc/spear/spear.toml")
    assert str(err.value).startswith("/etc/spear/spear.toml: unknown key nats.url (the keys of [nats] are: urls,")


def test_list_settings_from_the_environment_are_comma_separated():
    settings = load_settings(None, {"SPEAR_NATS__URLS": "nats://a:1, nats://b:2"})
    assert settings.nats.urls == ["nats://a:1", "nats://b:2"]


@pytest.mark.parametrize(
    "url",
    [
        "nats://svc:correct horse@127.0.0.1:4222",  # a password with a space (nats-py sends it as is)
        "nats://svc:p\tw@127.0.0.1:4222",
        "ws://127.0.0.1:8080/some path",  # (a websocket path is nats-py's business)
    ],
)
def test_a_url_nats_py_uses_is_not_refused(url):
    """1516ce8's whitespace check looked at the whole URL, not its host: a password (or a
    websocket path) with a blank made a working URL "name no host"."""
    parsed = NatsClient._parse_server_uri(url)  # (what nats-py connects to: no error)
    assert parsed.hostname == "127.0.0.1"
    assert nats_url_problem(url) == ""
    Client(url)  # no ValueError
    with_overrides(load_settings(), nats={"urls": [url]})  # nor for `spear` (exit 2)


@pytest.mark.parametrize(
    "url", ["localhost", "localhost:4222", "localhost:", "[::1]:4222", "u:p@127.0.0.1:4222", "127.0.0.1:4222/"]
)
def test_a_url_without_a_scheme_that_nats_py_takes_is_not_refused(url):
    """`host:port` with no scheme is nats:// to nats-py (the probe67 check must not refuse it)."""
    assert NatsClient._parse_server_uri(url).scheme == "nats"
    assert nats_url_problem(url) == ""
    assert load_settings(None, {"SPEAR_NATS_URL": f"nats://a:1,{url}"}).nats.urls == ["nats://a:1", url]


@pytest.mark.parametrize("url", ["htp:/foo", "nats:/127.0.0.1:4222", "tls:/host", "localhost:?x"])
@pytest.mark.parametrize("variable", ["SPEAR_NATS_URL", "SPEAR_NATS__URLS"])
def test_a_mistyped_scheme_is_refused_not_taken_for_a_host(url, variable):
    """probe67: `htp:/foo` (one slash) was nats://htp:/foo to nats-py, host `htp`, and a worker
    retried it for ever ("Name or service not known"); it is a configuration error now."""
    with pytest.raises(ConfigError) as err:
        load_settings(None, {variable: f"nats://a:1,{url}"})
    said = str(err.value)
    assert said.startswith(f"environment variable {variable}=") and "\n" not in said, said
    assert f"{url!r} is neither host:port nor scheme://host:port" in said, said
    with pytest.raises(ValueError, match="NATS URL"):
        Client(url)  # (the client library checks as the settings do)


@pytest.mark.parametrize("url", ["NATS://127.0.0.1:4222", "Tls://127.0.0.1:4222", "nats://127.0.0.1:0"])
def test_a_url_nats_py_would_mangle_is_refused(url):
    """nats-py looks for the scheme as written ("nats://" in url): 'NATS://127.0.0.1:4222' becomes
    nats://NATS://127.0.0.1:4222, host 'nats' (urlsplit lowercases the scheme, so it passed); and
    port 0 is no port to connect to. Both then read as NATS unavailable, what probe28 fixed."""
    with pytest.raises(ValueError, match="NATS URL"):
        Client(url)


@pytest.mark.parametrize(
    "toml, env, source",
    [
        ("[nats]\nurls = []\n", {}, "spear.toml: "),
        (None, {"SPEAR_NATS_URL": ""}, "environment variable SPEAR_NATS_URL=''"),
        (None, {"SPEAR_NATS__URLS": " , "}, "environment variable SPEAR_NATS__URLS"),
    ],
)
def test_an_empty_list_of_nats_urls_is_refused(toml, env, source):
    """probe58: no URL at all made a component spin at 100% CPU, deaf to SIGTERM (nats-py's
    NoServersError loop)."""
    with pytest.raises(ConfigError) as err:
        load_settings(toml, env)
    said = str(err.value)
    assert said.startswith(source) and "no NATS server given" in said and "\n" not in said, said
