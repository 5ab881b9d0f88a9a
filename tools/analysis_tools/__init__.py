"""The benchmark tools' library: timings, peak memory and their tables (not in mmdwnet)."""
