"""Adapter artifacts: typed configs per kind, PEFT import/export, NOLA, validation."""
