"""The job-sessions dialect (IBM Qiskit Runtime sessions, seed 004)."""
