"""Alembic migrations of the registry's metadata database.

A package (not just a folder) so that the wheel ships it: `peftreg.registry.db.migrate`
points Alembic's `script_location` at this directory, no alembic.ini needed.
"""
