"""Starts the real services as processes for integration and end-to-end tests."""
