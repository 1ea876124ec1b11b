"""Optimizers: first-order baselines, K-FAC and two-level K-FAC."""
