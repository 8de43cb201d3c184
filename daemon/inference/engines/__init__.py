"""The engines: the reference (keras), the fast one (fast/), their contract and the factory."""
