"""Benchmarks: each script times mimcli against the named alternative in the same process run and
prints ratios (see BENCHMARKS.md). Run one with ``python -m benchmarks.<name>``, all with
``python -m benchmarks`` (or ``make bench``); ``--smoke`` runs minimal sizes (used by the tests)."""
