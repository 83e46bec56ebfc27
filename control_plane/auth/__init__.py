"""Operator authentication: API keys, stored only as hashes."""
