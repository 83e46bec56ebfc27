"""Certificates: the built-in CA, certificate identities and the config-signing keys."""
