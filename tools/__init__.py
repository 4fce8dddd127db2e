"""Developer tools outside the runtime package: the transformers reference models (parity tests, benchmark),
HLO inspection, and the benchmark's parts. Not installed with omni_jax; launchers and tests import them from
the repository root."""
