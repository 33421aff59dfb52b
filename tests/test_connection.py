"""Connecting with the configured credentials, against a real nats-server that requires them."""

import asyncio

import pytest

from spear.core.config import load_settings, with_overrides
from spear.jetstream.connection import CredentialsRefused, connect
from spear.jetstream.embedded import EmbeddedNats


async def test_credentials_from_settings_are_used_and_required(tmp_path):
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
    finally:
        server.stop()
