"""The process: uvicorn, the embedded PostgreSQL, local clusters and the collector policy."""
