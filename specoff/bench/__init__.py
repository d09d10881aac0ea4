"""Benchmark code, out of the engine's import path: random upcycled pairs and tiny
checkpoints (synthetic), the transformers/accelerate peers (baselines)."""
