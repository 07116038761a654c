"""The built-in agent worker: real, deterministic agents (no network, no model weights)."""
