"""The tools' library: the benchmarks' timings, peak memory and tables, and the Markdown
rendering of the docs' generated sections (the model zoo's tables included); not in mmdwnet."""
