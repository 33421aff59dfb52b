"""TLS and mTLS to NATS for every connection spear makes, against a real nats-server that requires
client certificates (made here with openssl: a CA, a server and a client certificate)."""

import asyncio
import contextlib
import json
import shutil
import subprocess
from contextlib import AsyncExitStack
from pathlib import Path

import nats
import pytest

from spear.core.config import ConfigError, load_settings, with_overrides
from spear.jetstream.connection import CredentialsRefused, connect, credentials
from spear.jetstream.embedded import EmbeddedNats
from tests.conftest import invoke_body, start_spear
from tests.processes import spawn

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")


def _certificates(directory: Path) -> None:
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True, timeout=30)

    key = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    openssl("req", "-x509", *key, "-keyout", "ca-key.pem", "-out", "ca.pem", "-days", "2", "-subj", "/CN=test-ca")
    (directory / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for who in ("server", "client"):
        openssl("req", *key, "-keyout", f"{who}-key.pem", "-out", f"{who}.csr", "-subj", f"/CN={who}")
        openssl(
            *("x509", "-req", "-in", f"{who}.csr", "-CA", "ca.pem", "-CAkey", "ca-key.pem", "-CAcreateserial"),
            *("-out", f"{who}.pem", "-days", "2", "-extfile", "san.ext"),
        )


@pytest.fixture(scope="module")
def mtls(tmp_path_factory):
    """A nats-server with JetStream that accepts only TLS clients with a certificate from our CA."""
    directory = tmp_path_factory.mktemp("tls")
    _certificates(directory)
    tls = {name: str(directory / name) for name in ("ca.pem", "server.pem", "server-key.pem")}
    server = EmbeddedNats(
        directory / "nats",
        port=-1,
        extra_config=(
            f"tls {{ cert_file: {json.dumps(tls['server.pem'])}, key_file: {json.dumps(tls['server-key.pem'])},"
            f" ca_file: {json.dumps(tls['ca.pem'])}, verify: true }}"
        ),
    )
    url = server.start()
    yield url, directory
    server.stop()


def _settings(url: str, **tls: str):
    return with_overrides(load_settings(), nats={"urls": [url], **tls}, subject_prefix="tls")


def _mutual(directory: Path) -> dict[str, str]:
    return {
        "tls_ca": str(directory / "ca.pem"),
        "tls_cert": str(directory / "client.pem"),
        "tls_key": str(directory / "client-key.pem"),
    }


async def test_components_and_clients_work_over_mtls(mtls):
    url, directory = mtls
    assert url.startswith("tls://")
    settings = _settings(url, **_mutual(directory))
    async with AsyncExitStack() as stack:
        spear = await start_spear(stack, settings)  # gateway, worker, projection: each connects with TLS
        client = await nats.connect(settings.nats.urls, **credentials(settings))  # the CLI's way
        stack.push_async_callback(client.close)
        reply, _ = await spear.call(client, "invoke_function", invoke_body("echo", value="over tls"))
        assert reply["result"]["result"] == "over tls"


@pytest.mark.parametrize(
    "tls, fragment",
    [
        ({"tls_ca": "ca.pem"}, "CERTIFICATE_REQUIRED"),  # no client certificate
        ({"tls_cert": "client.pem", "tls_key": "client-key.pem"}, "CERTIFICATE_VERIFY_FAILED"),  # server not trusted
    ],
)
async def test_a_refused_tls_handshake_stops_start_up_at_once(mtls, tls, fragment):
    url, directory = mtls
    settings = _settings(url, **{key: str(directory / name) for key, name in tls.items()})
    with pytest.raises(CredentialsRefused) as refused:
        await asyncio.wait_for(connect(settings, "test"), 10)
    assert "TLS" in str(refused.value) and fragment in str(refused.value)


@pytest.mark.parametrize(
    "tls, named",
    [
        ({"tls_ca": "/nonexistent/ca.pem"}, "[nats] tls_ca (SPEAR_NATS__TLS_CA): /nonexistent/ca.pem: No such file"),
        ({"tls_ca": __file__}, "[nats] tls_ca (SPEAR_NATS__TLS_CA): " + __file__),  # not a certificate
        ({"tls_cert": "/none/c.pem", "tls_key": "/none/k.pem"}, "[nats] tls_cert and tls_key"),
    ],
)
def test_a_tls_file_that_cannot_be_used_is_a_configuration_error_naming_the_setting(tls, named):
    with pytest.raises(ConfigError) as refused:
        credentials(_settings("tls://127.0.0.1:1", **tls))
    assert str(refused.value).startswith(named), refused.value


@pytest.mark.slow
async def test_the_cli_invokes_over_mtls_with_settings_from_the_environment(mtls, tmp_path):
    url, directory = mtls
    settings = _settings(url, **_mutual(directory))
    environment = {f"SPEAR_NATS__{key.upper()}": value for key, value in _mutual(directory).items()}
    async with AsyncExitStack() as stack:
        await start_spear(stack, settings)
        invoked = await spawn("invoke", "demo", "echo", "value=7", "--nats-url", url, prefix="tls", env=environment)
        out, _ = await asyncio.wait_for(invoked.communicate(), 30)
    assert invoked.returncode == 0 and json.loads(out) == 7


async def test_the_client_without_a_certificate_the_server_wants_is_told_so(mtls):
    from spear import errors
    from spear.client.connection import open_connection

    url, directory = mtls
    settings = _settings(url, tls_ca=str(directory / "ca.pem"))
    with pytest.raises((errors.Unavailable, errors.Unauthenticated)) as failed:
        await open_connection([url], dict(credentials(settings)), "test", 3.0)
    # the server's alert once it is read, else (only cut off) the hint
    assert "certificate required" in str(failed.value) or "client certificate" in str(failed.value), failed.value


async def test_tls_asked_of_a_server_that_does_not_require_it_connects_nothing_in_plain_text(nats_url, mtls):
    """probe33: `tls://`, or TLS settings, against a NATS that does not require TLS (or an
    attacker who strips the flag) connected in plain text, password and all, silently. The
    connection is refused before anything is sent (a proxy records what the client sends): the
    SDK says Unauthenticated at once, a component's start-up stops (CredentialsRefused)."""
    import ssl
    from urllib.parse import urlsplit

    from spear import errors
    from spear.client import Client

    _, directory = mtls
    target = urlsplit(nats_url)
    sent = bytearray()

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, record: bool) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                if record:
                    sent.extend(data)
                writer.write(data)
                await writer.drain()
        writer.close()

    async def proxied(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        server_reader, server_writer = await asyncio.open_connection(target.hostname, target.port)
        await asyncio.gather(relay(client_reader, server_writer, True), relay(server_reader, client_writer, False))

    proxy = await asyncio.start_server(proxied, "127.0.0.1", 0)
    port = proxy.sockets[0].getsockname()[1]
    try:
        context = ssl.create_default_context(cafile=str(directory / "ca.pem"))
        for servers, options in ((f"tls://127.0.0.1:{port}", {}), (f"nats://127.0.0.1:{port}", {"tls": context})):
            with pytest.raises(errors.Unauthenticated) as refused:
                await Client(servers, connect_timeout=5, user="u", password="s3cret", **options).connect()
            assert "does not require it" in str(refused.value), refused.value
        with pytest.raises(CredentialsRefused) as stopped:
            settings = _settings(f"nats://u:s3cret@127.0.0.1:{port}", tls_ca=str(directory / "ca.pem"))
            await asyncio.wait_for(connect(settings, "test"), 10)
        assert "does not require it" in str(stopped.value), stopped.value
        assert b"s3cret" not in sent and b"CONNECT" not in sent, bytes(sent)
    finally:
        proxy.close()
