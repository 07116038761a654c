"""Client-facing Switchboard package: the `switchboard` CLI, client helpers and the agent-worker SDK."""
