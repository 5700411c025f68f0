"""The Sandbox execute API (Nadoo Sandbox, seed 003): one-shot executions under /api/v1/execute."""
