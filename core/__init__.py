"""Leaf package: the likelihoods (losses) and the one-line user-facing errors every layer shares."""
