"""The adapters over the service layer: the NATS micro gateway and the aiohttp HTTP API with its
OpenAPI document."""
