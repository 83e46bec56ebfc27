"""Helpers shared by tests: real certificates, real brokers and services, never mocks."""
