"""Dependency-free contracts shared by the daemon and the stage venvs (stdlib + pyyaml only)."""
