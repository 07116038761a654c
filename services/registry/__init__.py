"""The registry: which agents exist, where their workers listen and how they are run."""
