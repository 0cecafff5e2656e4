"""mosaiq pipeline stages: pure functions over Arrow tables, thin Ray adapters, job entry points."""
