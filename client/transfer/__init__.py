"""Verified, resumable blob transfers and directory push/pull."""
