"""The web UI under `/ui/`: server-rendered pages over the catalog, jobs and auth domains."""
