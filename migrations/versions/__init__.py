"""Revision scripts (a package only so that setuptools ships it; Alembic skips this file)."""
