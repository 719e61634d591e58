"""Training of learned compressors (optax, orbax)."""
