"""PRNG keys for one batch or one key per row.

A served batch mixes requests that arrived at different times with their own seeds, so each row carries
its own key ([B, 2] raw uint32 keys) and a row's draws never depend on what else shares the batch. Offline
batches keep one key ([2]). Both go through the same two functions, so the model code does not care which.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def split_keys(key: jax.Array, num: int) -> jax.Array:
    """[num, *key.shape]: `jax.random.split` of one key [2], or of every row's key [B, 2] on its own."""
    if key.ndim == 1:
        return jax.random.split(key, num)
    return jnp.swapaxes(jax.vmap(lambda k: jax.random.split(k, num))(key), 0, 1)


def categorical(key: jax.Array, logits: jax.Array) -> jax.Array:
    """Draws [B] from logits [B, V]: with one key [2] for the batch, or row b from its own key[b] ([B, 2])."""
    if key.ndim == 1:
        return jax.random.categorical(key, logits, axis=-1)
    return jax.vmap(lambda k, row: jax.random.categorical(k, row))(key, logits)
