"""hiera-fast's benchmark suites (``pytest benchmarks/``) and their report (``python -m benchmarks.report``)."""
