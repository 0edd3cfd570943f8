"""Latent factors from the interaction store: incremental implicit ALS, versioned artifacts.

Modules: read (Postgres to raw arrays), matrix (weighing, hold-out, filtering), als (full
and incremental fits), align (Procrustes between versions), quality (held-out scores),
versions (model_versions rows, artifacts, the lock), service (one run end to end).
"""
