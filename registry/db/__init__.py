"""Metadata: SQLAlchemy 2 models, engine set-up and keyword-only queries."""
