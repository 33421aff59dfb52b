"""Everything that talks to JetStream: the event store (the only writer), direct gets, pull
consumers, the topology, connections and the embedded nats-server."""
