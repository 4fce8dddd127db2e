"""Sharding: logical axis names -> mesh axes (one rules table), device meshes, and the sharded jit.

  rules.py  DEFAULT_RULES, logical_spec, constrain, use_mesh, param/tree shardings, place
  mesh.py   mesh specs ("tp4ep8"), make_mesh, multi-host setup (importable without jax)
  jit.py    sharded_jit and the shardings of step states (KV caches, per-row fields)

Submodules are imported explicitly (`from omni_jax.sharding import rules`), so launchers can parse a
mesh spec before jax is imported.
"""
