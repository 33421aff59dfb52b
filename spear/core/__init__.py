"""The pure core: wire contract, events, the state fold and next-step rules, settings, names, ids.

No I/O here: nothing in this package imports nats, aiohttp or opentelemetry (a test enforces it).
"""
