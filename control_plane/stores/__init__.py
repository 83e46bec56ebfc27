"""Stores: where devices live, with a time zone and configuration."""
