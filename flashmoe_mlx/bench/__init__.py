"""Benchmarks and routing studies (`python -m flashmoe_mlx.bench`): routing traces and the policy simulator."""
