"""Versioned definitions of every mosaiq table, the shard sample JSON and the quality-stats JSON."""
