"""Operations: Prometheus metrics, the health probes and their HTTP server, JSON logs."""
