"""Connecting with the configured credentials, against a real nats-server that requires them."""

import asyncio
import logging

import pytest

from spear.core.config import ConfigError, load_settings, with_overrides
from spear.jetstream.connection import CredentialsRefused, connect
from spear.jetstream.embedded import EmbeddedNats


async def test_credentials_from_settings_are_used_and_required(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="spear.jetstream.connection")
    server = EmbeddedNats(tmp_path, port=-1, extra_config='authorization { user: "spear", password: "s3cret" }')
    url = server.start()
    try:
        good = with_overrides(load_settings(), nats={"urls": [url], "user": "spear", "password": "s3cret"})
        nc = await connect(good, "test")
        assert nc.is_connected
        await nc.close()
        bad = with_overrides(load_settings(), nats={"urls": [url], "user": "spear", "password": "wrong"})
        with pytest.raises(CredentialsRefused) as error:  # at once, not after endless retries
            await asyncio.wait_for(connect(bad, "test"), 5)
        assert "refused the credentials" in str(error.value)
        said = [r.getMessage() for r in caplog.records]
        assert said and not [line for line in said if "trying again" in line], said  # (it does not: review43)
    finally:
        server.stop()


async def test_a_disconnect_is_a_warning_only_when_it_was_not_asked_for(tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="spear.jetstream.connection")
    server = EmbeddedNats(tmp_path, port=-1)
    url = server.start()
    settings = with_overrides(load_settings(), nats={"urls": [url]})

    def said(level: int) -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelno == level and "disconnected" in r.getMessage()]

    try:
        await (await connect(settings, "test")).close()
        await (await connect(settings, "test")).drain()
        assert said(logging.WARNING) == [] and len(said(logging.DEBUG)) == 2  # asked for: debug
        nc = await connect(settings, "test")
    finally:
        server.stop()
    try:
        for _ in range(500):  # the server gone: the client notices, says so, and reconnects
            if said(logging.WARNING):
                break
            await asyncio.sleep(0.01)
        assert said(logging.WARNING) == ["nats: disconnected"]
    finally:
        await nc.close()


@pytest.mark.parametrize("servers", [1, 3])
async def test_an_unreachable_server_is_said_once_with_its_address_not_four_times_a_second(caplog, servers):
    from tests.processes import free_port

    caplog.set_level(logging.DEBUG, logger="spear.jetstream.connection")
    urls = [f"nats://127.0.0.1:{free_port()}" for _ in range(servers)]  # nothing listens there
    connecting = asyncio.ensure_future(connect(with_overrides(load_settings(), nats={"urls": urls}), "test"))
    await asyncio.sleep(2.0)  # ~8 attempts, 0.25 s apart, the servers in turn (each its own error text)
    connecting.cancel()
    await asyncio.gather(connecting, return_exceptions=True)
    warnings = [  # (this connection's: another test's components may still be saying goodbye)
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and r.name == "spear.jetstream.connection"
    ]
    assert len(warnings) <= servers and all(w.startswith(f"nats ({', '.join(urls)}): ") for w in warnings), warnings
    assert warnings


async def test_a_password_in_the_url_is_not_shown_when_refused(tmp_path):
    """probe30: a refused password given in the URL was printed back in the error (terminals,
    logs); the SDK's error too."""
    from spear import errors
    from spear.client import Client

    server = EmbeddedNats(tmp_path, port=-1, extra_config='authorization { user: "spear", password: "s3cret" }')
    url = server.start()
    try:
        wrong = url.replace("://", "://spear:wr0ngpass@", 1)
        with pytest.raises(CredentialsRefused) as refused:
            await asyncio.wait_for(connect(with_overrides(load_settings(), nats={"urls": [wrong]}), "test"), 5)
        with pytest.raises(errors.Unauthenticated) as unauthenticated:
            await Client(wrong, connect_timeout=5).connect()
        for said in (str(refused.value), str(unauthenticated.value)):
            assert "wr0ngpass" not in said and "spear:***@127.0.0.1" in said, said
    finally:
        server.stop()


@pytest.mark.parametrize(
    "url, shown",
    [
        ("nats://127.0.0.1:4222", "nats://127.0.0.1:4222"),
        ("nats://t0ken@h:1", "nats://***@h:1"),  # (a token)
        ("tls://user:p@ss:w@h:1", "tls://user:***@h:1"),
        ("user:secret@h:1", "user:***@h:1"),
        ("nats://alice:part1://part2@h:1", "nats://alice:***@h:1"),  # (review30: "://" in a password)
    ],
)
def test_urls_are_shown_without_their_password(url, shown):
    from spear.core.config import shown_url

    assert shown_url(url) == shown


@pytest.mark.parametrize("key", ["SPEAR_NATS_URL", "SPEAR_NATS__URLS"])
def test_a_refused_variable_is_named_without_the_password_it_holds(key):
    """review30: a refused URL from the environment was masked in the refusal but printed whole
    where the error named its source (`environment variable KEY='value'`); spear up hands its
    workers the URLs in SPEAR_NATS_URL."""
    from spear.core.config import ConfigError, load_settings

    with pytest.raises(ConfigError) as refused:
        load_settings(None, {key: "nats://127.0.0.1:4222,nats://alice:s3cretPW@127.0.0.1:99999"})
    assert "s3cretPW" not in str(refused.value) and key in str(refused.value), refused.value
    # (review31: nor one in a URL of another setting)
    with pytest.raises(ConfigError) as refused:
        load_settings(None, {"SPEAR_TELEMETRY__OTLP_ENDPOINT": "http://app:s3cretPW@collector:4318/ x"})
    assert "s3cretPW" not in str(refused.value) and "OTLP_ENDPOINT" in str(refused.value), refused.value


def test_the_sdk_refusing_a_url_does_not_show_its_password():
    """review27: the SDK's own check of a URL printed it whole."""
    from spear.client import Client

    with pytest.raises(ValueError) as refused:
        Client("nats://alice:s3cretPW@127.0.0.1:0")
    assert "s3cretPW" not in str(refused.value) and "alice:***@" in str(refused.value), refused.value


async def test_a_creds_file_connects_the_sdk(spear, nats_url, tmp_path):
    """probe33: `creds_file` (a NATS user JWT and its NKey seed) failed in a plain install with
    "cannot reach NATS ...: No module named 'nkeys'": nats-py signs with it, and spear did not
    depend on it. (This server asks for no credentials, so it takes them unchecked: what is
    shown is that the SDK reads and uses the file.)"""
    import base64
    import os

    import nkeys

    from spear.client import Client

    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER).decode()
    claims = base64.urlsafe_b64encode(b'{"sub":"U"}').decode().rstrip("=")
    jwt = f"eyJ0eXAiOiJKV1QiLCJhbGciOiJlZDI1NTE5LW5rZXkifQ.{claims}.c2ln"
    creds = tmp_path / "user.creds"
    creds.write_text(
        f"-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n"
        f"-----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
    )
    async with Client(nats_url, prefix=spear.settings.subject_prefix, creds_file=str(creds)) as sdk:
        assert (await sdk.health())["status"] == "healthy"


@pytest.mark.parametrize(
    "value",
    [
        "http://app:s3cret/PW@collector:4318/ x",  # a password holding "/" (base64 ones do)
        "http://me@corp.example:s3cretPW@collector:4318/ x",  # a user that is an e-mail address
    ],
)
def test_a_url_password_in_a_refused_variable_is_masked(value):
    """review32: the pattern stopped the password at "/" and the user at "@", so these passwords
    were printed whole (shown_url, used for NATS URLs, masks both)."""
    with pytest.raises(ConfigError) as refused:
        load_settings(None, {"SPEAR_TELEMETRY__OTLP_ENDPOINT": value})
    assert "s3cret" not in str(refused.value), refused.value


def test_the_redactor_masks_such_url_passwords_too():
    from spear.core.redact import Redactor

    shown = Redactor([]).values({"DB": "postgres://app:s3cret/PW@db:5432/x", "M": "smtp://me@corp.example:s3cretPW@mx"})
    assert not any("s3cret" in v for v in shown.values()), shown


async def test_a_frozen_server_is_noticed_within_seconds_by_components_and_the_sdk(tmp_path):
    """probe58: a hung (SIGSTOPped) node kept its clients about 6 minutes (nats-py pings every
    120 s, 2 outstanding). Both connections must find it stale within 15 s."""
    import signal

    from spear.client.connection import open_connection
    from tests.processes import free_port

    server = EmbeddedNats(tmp_path, port=free_port())
    url = await asyncio.to_thread(server.start)
    components = sdk = None
    try:
        components = await connect(with_overrides(load_settings(), nats={"urls": [url]}), "test")
        sdk = await open_connection([url], {}, "test-sdk", 5)
        assert server.process is not None
        server.process.send_signal(signal.SIGSTOP)
        try:
            loop = asyncio.get_running_loop()
            began = loop.time()
            while components.is_connected or sdk.is_connected:
                assert loop.time() - began < 15, "a frozen server still counts as connected after 15 s"
                await asyncio.sleep(0.2)
        finally:
            server.process.send_signal(signal.SIGCONT)
    finally:
        for nc in (components, sdk):
            if nc is not None:
                await nc.close()
        await asyncio.to_thread(server.stop)
