"""Store provisioning: the persisted, resumable saga that takes a store made from a template
to *ready* (see docs/provisioning.md), and undoes it on cancel or failure."""
