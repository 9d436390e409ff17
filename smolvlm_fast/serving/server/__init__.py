"""serving/server."""
