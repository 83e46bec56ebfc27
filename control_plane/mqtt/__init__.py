"""The control plane's own MQTT session."""
