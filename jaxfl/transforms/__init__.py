"""Optax transformations: client, uplink, aggregation and server roles."""
