"""Ingest: watch the export folder, read headers, group images into acquisitions and echoes, decide completion."""
