"""Server-side jobs: a queue in the database, workers that claim it, and handlers."""
