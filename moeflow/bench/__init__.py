"""Benchmarks: `moeflow bench offline` (engine configurations side by side) and `moeflow bench serve`."""
