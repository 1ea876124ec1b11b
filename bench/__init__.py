"""Performance harness: step cost of SGD, Adam, K-FAC and two-level K-FAC against their floors.

Run ``python -m bench --out bench/out`` (``make bench``); ``--quick`` for a smoke run.
"""
