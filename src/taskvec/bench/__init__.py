"""Benchmark suites of taskvec: real, offline-installable models and data sets."""
