"""Operator tasks over the whole store: garbage collection and consistency checks."""
