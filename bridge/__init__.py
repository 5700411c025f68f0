"""kernel-bridge core: sessions, runs and kernels. No HTTP here (DESIGN.md)."""

__version__ = "0.1.0"
