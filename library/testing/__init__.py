"""Tiny models and toy datasets built locally, for tests, the demo and benchmarks (no hub, fixed seeds)."""
