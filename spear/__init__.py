"""spear: event-sourced function invocation on NATS JetStream."""

__version__ = "0.1.0"
