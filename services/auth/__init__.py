"""The auth service: users, passwords, API keys, tokens, signing keys and revocations."""
