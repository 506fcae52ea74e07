"""Benchmarks against reference implementations: sample, numbers, train."""
