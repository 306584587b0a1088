"""Benchmarks: commands that start the real processes, drive load, print a table, write a report."""
