"""Command-line entry points (installed as sh2-* commands)."""
