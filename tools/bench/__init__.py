"""launch/bench.py's parts: harness (timing), roofline (machine + analytic counts), checkpoints, phases, report."""
