"""Device meshes from short specs ("tp4ep8", "dp2tp4", "ep8", "tp1", "auto") and multi-host setup.

Importing this module does not import jax (launchers parse --mesh before XLA_FLAGS is final); jax is
imported by the functions that build meshes or touch devices.

Every mesh has all three axes of omni_jax.sharding (data, expert, tensor), absent ones with
size 1, so sharding rules may always name any of them. Axis order puts `tensor` innermost:
its per-layer all-reduces are the most frequent collectives, so its devices should be
neighbours (same host / NVLink island); `expert` comes next, `data` outermost.
"""

from __future__ import annotations

import math
import os
import re
from typing import Sequence

from omni_jax.errors import UsageError

# Mesh axis names: the rules table (omni_jax.sharding.rules) maps logical axes onto these.
DATA, TENSOR, EXPERT = "data", "tensor", "expert"
MESH_AXES: tuple[str, ...] = (DATA, EXPERT, TENSOR)
_PREFIX = {"dp": DATA, "ep": EXPERT, "tp": TENSOR}
_TOKEN = re.compile(r"(dp|tp|ep)([0-9]+)")


class MeshSpecError(UsageError):
    """A mesh spec string is malformed or does not fit the available devices."""


def _explicit_sizes(spec: str) -> dict[str, int]:
    """The grammar: one or more of dp<N>, tp<N>, ep<N>, each at most once ('auto' is handled by callers)."""
    sizes = {DATA: 1, EXPERT: 1, TENSOR: 1}
    seen: set[str] = set()
    pos = 0
    for m in _TOKEN.finditer(spec):
        if m.start() != pos:
            break
        prefix, n = m.group(1), int(m.group(2))
        if prefix in seen:
            raise MeshSpecError(f"mesh spec {spec!r} names '{prefix}' twice")
        if n < 1:
            raise MeshSpecError(f"mesh spec {spec!r}: size of '{prefix}' must be >= 1, got {n}")
        seen.add(prefix)
        sizes[_PREFIX[prefix]] = n
        pos = m.end()
    if pos != len(spec) or not seen:
        raise MeshSpecError(
            f"cannot parse mesh spec {spec!r} (at {spec[pos:]!r}); expected one or more of dp<N>, tp<N>, ep<N> "
            "such as 'tp4ep8', 'dp2tp4', 'ep8', 'tp1', or 'auto'"
        )
    return sizes


def _normalized(spec: str) -> str:
    if not isinstance(spec, str) or not spec.strip():
        raise MeshSpecError("empty mesh spec; use e.g. 'tp4ep8', 'ep8', 'dp2tp4', 'tp1' or 'auto'")
    return spec.strip().lower()


def parse_mesh_spec(spec: str, num_devices: int, num_experts: int | None = None) -> dict[str, int]:
    """'tp4ep8' -> {'data': 1, 'expert': 8, 'tensor': 4}; the product must equal num_devices.

    'auto' puts as many devices as possible on the expert axis (the largest divisor of
    num_devices that also divides num_experts, all of them when num_experts is unknown) and
    the rest on tensor.
    """
    spec = _normalized(spec)
    if spec == "auto":
        ep = num_devices if not num_experts else math.gcd(num_devices, num_experts)
        return {DATA: 1, EXPERT: ep, TENSOR: num_devices // ep}
    sizes = _explicit_sizes(spec)
    total = math.prod(sizes.values())
    if total != num_devices:
        raise MeshSpecError(
            f"mesh spec {spec!r} needs {total} devices (data={sizes[DATA]} x expert={sizes[EXPERT]} x "
            f"tensor={sizes[TENSOR]}) but jax sees {num_devices} device(s); use sizes whose product is "
            f"{num_devices}, or 'auto'"
        )
    return sizes


def spec_size(spec: str) -> int | None:
    """Devices an explicit spec names ('tp4ep8' -> 32), None for 'auto' (it fits whatever is there)."""
    spec = _normalized(spec)
    return None if spec == "auto" else math.prod(_explicit_sizes(spec).values())


def check_model_fits(sizes: dict[str, int], config, spec: str = "") -> None:
    """MeshSpecError unless the mesh splits the model the way the sharding rules intend.

    The rules replicate a dimension its mesh axis does not divide (sharding.logical_spec). That is fine for
    small tensors (the talker's 2 KV heads under tp4), but an expert count the expert axis does not divide
    would replicate every expert weight (the bulk of the model) and attention heads the tensor axis does not
    divide would replicate the attention: never what a user asking for that mesh wants. KV heads may be
    fewer than the tensor axis (replicated groups) but must otherwise divide evenly.
    """
    ep, tp = sizes.get(EXPERT, 1), sizes.get(TENSOR, 1)
    name = f"mesh spec {spec!r}" if spec else "the mesh"
    problems = []
    stacks = [("thinker", config.thinker.text)]
    if getattr(config, "enable_audio_output", True) and getattr(config, "talker", None) is not None:
        stacks += [("talker", config.talker.text), ("code predictor", config.talker.code_predictor)]
    for label, dec in stacks:
        experts = getattr(dec, "num_experts", 0) or 0
        if experts and ep > 1 and experts % ep:
            problems.append(f"expert axis {ep} does not divide the {label}'s {experts} experts")
        if tp > 1 and dec.num_attention_heads % tp:
            problems.append(f"tensor axis {tp} does not divide the {label}'s {dec.num_attention_heads} attention heads")
        kv = dec.num_key_value_heads
        if tp > 1 and kv % tp and tp % kv:
            problems.append(f"tensor axis {tp} and the {label}'s {kv} KV heads do not divide one another")
    if problems:
        raise MeshSpecError(f"{name} (data={sizes.get(DATA, 1)} x expert={ep} x tensor={tp}) does not fit the model: "
                            + "; ".join(problems) + ". Pick sizes that divide these counts (or --mesh=auto).")


def make_mesh(spec: str, devices: Sequence | None = None, num_experts: int | None = None,
              config=None):
    """Build a Mesh (axes data, expert, tensor; Auto axis types so GSPMD propagates shardings).

    config (an OmniConfig): also check the mesh fits the model (`check_model_fits`); its thinker's expert
    count is used for 'auto' unless num_experts is given."""
    import jax
    import numpy as np
    from jax.sharding import AxisType, Mesh

    devices = list(jax.devices() if devices is None else devices)
    if config is not None and num_experts is None:
        num_experts = config.thinker.text.num_experts
    sizes = parse_mesh_spec(spec, len(devices), num_experts)
    if config is not None:
        check_model_fits(sizes, config, spec)
    shape = tuple(sizes[a] for a in MESH_AXES)
    try:
        return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)
    except (ValueError, NotImplementedError, AssertionError):
        # Device layouts mesh_utils cannot map (e.g. a subset of devices): plain row-major order.
        return Mesh(np.asarray(devices, dtype=object).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def mesh_spec_string(mesh) -> str:
    """Inverse of parse_mesh_spec for logs: 'dp1ep8tp4'."""
    return "".join(f"{p}{mesh.shape.get(a, 1)}" for p, a in (("dp", DATA), ("ep", EXPERT), ("tp", TENSOR)))


# ----------------------------------------------------------------------------- multi-host

_ENV_COORD = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")
_ENV_NPROC = ("JAX_NUM_PROCESSES", "NUM_PROCESSES")
_ENV_PID = ("JAX_PROCESS_ID", "PROCESS_ID")
_initialized = False


def _env(names: Sequence[str]) -> str | None:
    for n in names:
        if os.environ.get(n):
            return os.environ[n]
    return None


def maybe_initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | None = None,
) -> bool:
    """Call jax.distributed.initialize when this program runs as one of several processes.

    Arguments (launcher flags) win over env vars JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
    JAX_PROCESS_ID. With no coordinator given, cluster auto-detection (SLURM, Open MPI, TPU
    pods) is used only if its usual environment is present. Returns True when initialized.
    Must run before anything touches jax devices. On CPU, cross-process collectives need
    jax_cpu_collectives_implementation='gloo', which is set here (other backends ignore it).
    """
    import jax

    global _initialized
    if _initialized:
        return True
    coordinator_address = coordinator_address or _env(_ENV_COORD)
    if num_processes is None and _env(_ENV_NPROC) is not None:
        num_processes = int(_env(_ENV_NPROC))
    if process_id is None and _env(_ENV_PID) is not None:
        process_id = int(_env(_ENV_PID))
    cluster = any(k in os.environ for k in ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES"))
    if coordinator_address is None and not cluster:
        if num_processes not in (None, 1):
            raise UsageError(f"num_processes={num_processes} but no coordinator address "
                             "(--coordinator_address or JAX_COORDINATOR_ADDRESS)")
        return False
    if num_processes == 1:
        return False
    if coordinator_address is not None and (num_processes is None or process_id is None):
        raise UsageError(
            f"multi-process run with coordinator {coordinator_address!r} needs both num_processes "
            f"(got {num_processes}) and process_id (got {process_id})"
        )
    # Only the CPU backend reads this; without it XLA:CPU cannot run cross-process collectives.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {}
    if local_device_ids is not None:
        kwargs["local_device_ids"] = list(local_device_ids)
    jax.distributed.initialize(coordinator_address, num_processes, process_id, **kwargs)
    _initialized = True
    return True


def is_primary() -> bool:
    """True on process 0 only: the one that writes files and prints results."""
    import jax

    return jax.process_index() == 0
