"""Benchmarks: our engine direct, through Triton gRPC, and transformers `generate`, side by side (`python -m bench.run`)."""
