"""The events service: the durable, per-user, acknowledged event log."""
