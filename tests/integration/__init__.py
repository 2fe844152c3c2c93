"""Integration tests: a real registry process (and real databases and stores)."""
