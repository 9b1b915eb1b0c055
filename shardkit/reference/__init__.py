"""Plain torch references (fp32/fp64) for tests and benchmarks: independent of every kernel."""
