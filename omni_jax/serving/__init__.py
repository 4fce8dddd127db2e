"""Serving over HTTP: the OpenAI wire format (`protocol`) and the FastAPI app (`app`) over the runtime's
continuous-batching `ServingEngine` (omni_jax.runtime.scheduler)."""
