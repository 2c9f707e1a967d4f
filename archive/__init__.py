"""The catalogue of the archive: configuration, index, matching and the ingest service."""
