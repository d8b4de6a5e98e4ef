"""Side-by-side benchmarks of plain Celery and celery-causal (``python -m benchmarks``)."""
