"""storefleet control plane: API, persistence, PKI, MQTT ingest and the embedded broker."""
