"""The `peftreg` command line (click)."""
