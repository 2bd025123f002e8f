"""The benchmark suite (``make bench``; method and figures in docs/BENCHMARKS.md)."""
