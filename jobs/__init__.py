"""YAML job configs and their loader."""
