"""Device health after ingest: history and its retention, staleness, store status roll-up."""
