"""The executor service: runs, their steps and the event outbox."""
