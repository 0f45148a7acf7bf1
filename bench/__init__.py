"""Benchmarks (not tests): they print ratios against anchors measured in the same run."""
