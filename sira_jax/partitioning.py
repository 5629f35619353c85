"""Device mesh, T5X-style logical axis rules, NamedSharding helpers and multi-host setup.

The mesh has three axes:
  'data'   - data parallelism (batch);
  'expert' - expert parallelism: adapter experts ('expert' logical axis) are split over it, and,
             as in T5X's MoE, non-expert computation uses it as a second data axis;
  'model'  - tensor parallelism (heads / mlp / vocab).

Params carry logical axis names (`nn.with_logical_partitioning` in the network and adapters);
`logical_axis_rules()` maps them to mesh axes. Everything is placed with
`jax.sharding.NamedSharding` and compiled with `jax.jit(in_shardings=..., out_shardings=...)`.

    mesh = make_mesh(data=2, expert=2, model=2)
    rules = logical_axis_rules()
    abstract = model_init.abstract_variables(model)           # boxed ShapeDtypeStructs
    shardings = variable_shardings(abstract, mesh, rules)     # NamedSharding per variable
    batch = shard_batch(numpy_batch, mesh, rules)

Multi-host (TPU/GPU pods, or several CPU processes): call `initialize_distributed(...)` before
anything touches devices; the mesh then spans every process's devices and `shard_batch` builds
global arrays from the batch (the same global batch on every host, or each host's slice with
`process_local=True`).
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Mapping, Sequence

import flax.linen as nn
import gin
import jax
import numpy as np
from jax._src import mesh as jax_mesh  # the mesh `with mesh:` binds (no public getter)
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


PyTree = Any
Rules = Sequence[tuple[str, Any]]

MESH_AXES = ('data', 'expert', 'model')
# Batch dimension of inputs/activations: over 'data' and 'expert' (T5X MoE convention).
BATCH_AXES = ('data', 'expert')


# ----------------------------------------------------------------------------------------------
# Mesh
# ----------------------------------------------------------------------------------------------
def make_mesh(data: int = -1, expert: int = 1, model: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A Mesh with axes ('data', 'expert', 'model') over `devices` (default: all, all hosts)."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = [data, expert, model]
  n = len(devices)
  if sizes.count(-1) > 1:
    raise ValueError(f'at most one mesh axis may be -1, got data={data} expert={expert} '
                     f'model={model}')
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if n % known:
      raise ValueError(f'{n} devices do not divide into expert*model={known}')
    sizes[sizes.index(-1)] = n // known
  if int(np.prod(sizes)) != n:
    raise ValueError(f'mesh data={sizes[0]} x expert={sizes[1]} x model={sizes[2]} = '
                     f'{int(np.prod(sizes))} devices, but {n} are available')
  try:
    from jax.experimental import mesh_utils
    arr = mesh_utils.create_device_mesh(tuple(sizes), devices)
  except Exception:  # e.g. CPU or unusual topologies
    arr = np.asarray(devices, dtype=object).reshape(sizes)
  return Mesh(arr, MESH_AXES)


# ----------------------------------------------------------------------------------------------
# Logical axis rules
# ----------------------------------------------------------------------------------------------
@gin.configurable
def logical_axis_rules(model_parallel_params: bool = True,
                       additional_rules: Rules = (),
                       batch_axes: Sequence[str] = BATCH_AXES) -> tuple[tuple[str, Any], ...]:
  """T5X's standard rules (1-D parameter partitioning) + 'expert' and 'rank'.

  Flax assigns mesh axes rule by rule, earlier rules first, and never gives one mesh axis to two
  dimensions of an array. So 'expert' comes first and 'batch' has a fallback: an activation named
  ('batch', 'expert', ...) resolves to P('data', 'expert', ...), E on the expert mesh axis, while
  ('batch', 'length') still splits the batch over `batch_axes` (default ('data', 'expert'), T5X's
  MoE convention). The einsum form's expert-major buffers are named ('expert_replicas',
  'expert', ...) (flaxformer's names; 'expert_replicas' -> 'data' here and in T5X's MoE rules). The same tuple
  serves T5X's partitioners (`PjitPartitioner(logical_axis_rules=logical_axis_rules())`);
  `additional_rules` come first so they override. Names not listed map to None (replicated).
  """
  mp = 'model' if model_parallel_params else None
  batch_axes = tuple(batch_axes)
  rules = [
      ('expert', 'expert'),
      ('batch', batch_axes),
      ('batch', 'data'),
      ('vocab', mp),
      ('embed', None),
      ('mlp', mp),
      ('heads', mp),
      ('kv', None),
      ('joined_kv', mp),
      ('relpos_buckets', None),
      ('abspos_buckets', None),
      ('length', None),
      ('layers', None),
      ('stack', None),
      ('mlp_activations', None),
      ('expert_replicas', 'data'),
      ('rank', None),
      ('unmodeled', None),
      ('cache_batch', batch_axes),
      ('cache_batch', 'data'),
      ('cache_heads', mp),
      ('cache_kv', None),
      ('cache_length', None),
  ]
  return tuple(additional_rules) + tuple(rules)


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Rules | None = None):
  """Binds `mesh` (`jax.set_mesh`) and the logical axis rules (flax) while the model is traced.

  Without both, every `nn.with_logical_constraint` / `with_logical_constraint` inside the model
  is a no-op (flax reads the *abstract* mesh, which `with mesh:` alone does not set), and the
  einsum form's expert buffers are never resharded onto the 'expert' axis. Wrap every jit call
  (its first call traces) of a model step in it.
  """
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules or logical_axis_rules()):
    yield mesh


def with_logical_constraint(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Sharding constraint from logical axis names under the bound mesh and rules (`activate`).

  Unlike `nn.with_logical_constraint`, a dimension whose mesh axes do not divide it keeps the
  longest prefix of them that does (or none: replicated), and mesh axes the bound mesh lacks are
  ignored, so one model runs on any mesh (e.g. 1 routing group cannot split over 8 devices). A
  no-op when no mesh or no rules are bound. The mesh is `jax.set_mesh`'s (`activate`) or, as T5X's
  partitioners bind it, `with mesh:`'s, which flax's own `nn.with_logical_constraint` ignores
  on jax 0.10.
  """
  mesh, legacy = _bound_mesh()
  rules = nn.get_logical_axis_rules()
  if mesh.empty or not rules:
    return x
  spec = []
  for dim, axes in zip(x.shape, nn.logical_to_mesh_axes(tuple(names), rules)):
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    axes = tuple(a for a in axes if a in mesh.shape)
    while axes and dim % int(np.prod([mesh.shape[a] for a in axes])):
      axes = axes[:-1]
    spec.append(axes[0] if len(axes) == 1 else (axes or None))
  spec = P(*spec)
  return jax.lax.with_sharding_constraint(x, spec if legacy is None else NamedSharding(legacy, spec))


def _bound_mesh():
  """(mesh, legacy): `jax.set_mesh`'s abstract mesh (`activate`), or else the mesh `with mesh:`
  binds (T5X's partitioners), which is then also `legacy`; an empty mesh when none is bound."""
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty:
    return mesh, None
  legacy = jax_mesh.thread_resources.env.physical_mesh  # `with mesh:` sets only this
  return legacy, legacy


def batch_axis_sizes() -> tuple[int, ...]:
  """Sizes of the bound mesh's axes that the logical 'batch' axis maps to, in rule order (e.g.
  (data, expert)); () when no mesh or no rules are bound. `routing.group_shards` turns them into
  the batch shards a step's tokens split over."""
  mesh, _ = _bound_mesh()
  rules = nn.get_logical_axis_rules()
  if mesh.empty or not rules:
    return ()
  axes = nn.logical_to_mesh_axes(('batch',), rules)[0]
  axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
  return tuple(int(mesh.shape[a]) for a in axes if a in mesh.shape)


def logical_to_mesh_spec(names: Sequence[str | None], rules: Rules | None = None) -> P:
  """('expert', 'rank', 'embed') -> PartitionSpec('expert', None, None) under `rules`."""
  return nn.logical_to_mesh_axes(tuple(names), rules or logical_axis_rules())


# ----------------------------------------------------------------------------------------------
# Variable shardings (abstract variables: sira_jax.model_init)
# ----------------------------------------------------------------------------------------------
def logical_specs(abstract: PyTree) -> PyTree:
  """Logical PartitionSpecs (axis names) of boxed variables; unboxed leaves get P()."""
  return nn.get_partition_spec(abstract)


def variable_shardings(abstract: PyTree, mesh: Mesh, rules: Rules | None = None) -> PyTree:
  """NamedSharding per variable (plain tree, same structure as the unboxed variables)."""
  specs = logical_specs(abstract)
  return nn.logical_to_mesh_sharding(specs, mesh, rules or logical_axis_rules())


def place(tree: PyTree, shardings: PyTree) -> PyTree:
  """Host arrays, identical on every process -> global arrays in `shardings`."""
  def put(x, s):
    if jax.process_count() == 1:
      return jax.device_put(x, s)
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])
  return jax.tree.map(put, tree, shardings)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def opt_state_shardings(opt_state_shapes: PyTree, params_shardings: PyTree,
                        mesh: Mesh) -> PyTree:
  """Shardings of an optax state (from `jax.eval_shape(tx.init, params)`).

  Every sub-tree shaped like the params (Adam's mu/nu, momentum, ...) takes the params'
  shardings; every other leaf (counts, factored statistics) is replicated.
  """
  p_def = jax.tree.structure(params_shardings)
  p_leaves = jax.tree.leaves(params_shardings)

  def is_params_like(x):
    try:
      return jax.tree.structure(x) == p_def
    except Exception:
      return False

  def assign(x):
    if is_params_like(x) and jax.tree.leaves(x):
      leaves = jax.tree.leaves(x)
      shard = [s if tuple(getattr(l, 'shape', ())) and len(s.spec) <= len(l.shape) else
               replicated(mesh) for l, s in zip(leaves, p_leaves)]
      return jax.tree.unflatten(p_def, shard)
    return replicated(mesh)
  return jax.tree.map(assign, opt_state_shapes, is_leaf=is_params_like)


# ----------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------
def batch_sharding(mesh: Mesh, ndim: int = 2, rules: Rules | None = None) -> NamedSharding:
  """Leading (batch) dim over the mesh axes the 'batch' rule names; other dims replicated."""
  spec = logical_to_mesh_spec(('batch',) + (None,) * (ndim - 1), rules)
  return NamedSharding(mesh, spec)


def shard_batch(batch: Mapping[str, Any], mesh: Mesh, rules: Rules | None = None, *,
                process_local: bool = False) -> dict[str, jax.Array]:
  """numpy batch -> global arrays sharded over the batch axes.

  process_local=False: every process passes the same *global* batch.
  process_local=True: each process passes its own slice (global batch = concatenation in
  process order), the usual multi-host input pipeline.
  """
  out = {}
  for k, v in batch.items():
    v = np.asarray(v)
    s = batch_sharding(mesh, v.ndim, rules)
    if process_local:
      out[k] = jax.make_array_from_process_local_data(s, v)
    else:
      out[k] = jax.make_array_from_callback(v.shape, s, lambda idx, v=v: v[idx])
  return out


# ----------------------------------------------------------------------------------------------
# Multi-host
# ----------------------------------------------------------------------------------------------
def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None,
                           local_device_ids: Sequence[int] | None = None,
                           cpu_collectives: str | None = 'gloo') -> None:
  """`jax.distributed.initialize` with CPU collectives set up; call before using devices.

  Arguments default to the environment (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
  JAX_PROCESS_ID) and otherwise to JAX's cluster auto-detection (TPU pods, SLURM, ...). On CPU
  platforms, cross-process collectives need `cpu_collectives` ('gloo' or 'mpi').
  Single process (nothing configured): does nothing.
  """
  env = os.environ
  coordinator_address = coordinator_address or env.get('JAX_COORDINATOR_ADDRESS')
  if num_processes is None and env.get('JAX_NUM_PROCESSES'):
    num_processes = int(env['JAX_NUM_PROCESSES'])
  if process_id is None and env.get('JAX_PROCESS_ID'):
    process_id = int(env['JAX_PROCESS_ID'])
  if coordinator_address is None and num_processes in (None, 1) and not _on_cluster():
    return
  platforms = (env.get('JAX_PLATFORMS') or jax.config.jax_platforms or '')
  if cpu_collectives and ('cpu' in platforms or not platforms):
    jax.config.update('jax_cpu_collectives_implementation', cpu_collectives)
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id,
                             local_device_ids=local_device_ids)


@gin.configurable
def enable_compilation_cache(cache_dir: str | None = None,
                             min_compile_seconds: float = 1.0) -> str | None:
  """Turns on JAX's persistent compilation cache; returns its directory (None: left off).

  A sweep of many short runs otherwise compiles the same train step in every process (30-90 s
  for a T5-small step on a 2-core CPU). cache_dir: default $JAX_COMPILATION_CACHE_DIR, else
  ~/.cache/sira_jax/xla; '' leaves the cache off. Only programs that took at least
  `min_compile_seconds` to compile are written.
  """
  if cache_dir is None:
    cache_dir = os.environ.get('JAX_COMPILATION_CACHE_DIR') or os.path.join(
        os.path.expanduser('~'), '.cache', 'sira_jax', 'xla')
  if not cache_dir:
    return None
  os.makedirs(cache_dir, exist_ok=True)
  jax.config.update('jax_compilation_cache_dir', cache_dir)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', min_compile_seconds)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  return cache_dir


def _on_cluster() -> bool:
  env = os.environ
  return any(k in env for k in ('TPU_WORKER_HOSTNAMES', 'SLURM_JOB_ID', 'OMPI_COMM_WORLD_SIZE',
                                'MEGASCALE_COORDINATOR_ADDRESS'))
