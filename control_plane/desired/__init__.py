"""Desired state: layered configuration, versioning, signing and publication."""
