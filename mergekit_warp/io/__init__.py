"""Checkpoint I/O: sources (folder, file, hub id), the lazy reader, preflight, the streaming shard
writer, and atomic publishing with provenance."""
