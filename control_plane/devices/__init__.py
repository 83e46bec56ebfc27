"""Devices: the inventory, with applied version and last health."""
