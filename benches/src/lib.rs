//! Benchmark harness: filled by the benchmarks issue.
