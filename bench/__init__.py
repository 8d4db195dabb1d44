"""Benchmarks: ours against a peer, side by side in one run, ratios printed (`python -m bench.<name>`)."""
