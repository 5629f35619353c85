"""The two layouts of the layer stacks' variables, and exact conversion between them.

Unscanned (`T5Config.scan_layers=False`, T5X's example network, every Hugging Face / T5X
checkpoint): one subtree per layer,

  encoder/layers_0/attention/query/kernel      [d_model, heads*d_kv]
  encoder/layers_1/attention/query/kernel      [d_model, heads*d_kv]
  ...

Scanned (`scan_layers=True`, one `nn.scan` per stack): one subtree per stack whose leaves hold
every layer, stacked on a leading axis (logical axis name `LAYERS_AXIS`, never sharded),

  encoder/layers/attention/query/kernel        [num_layers, d_model, heads*d_kv]

Everything outside the stacks (token_embedder, relpos_bias, the final norms, logits_dense) is the
same in both. The conversion is a stack / unstack on axis 0: exact, for any collection laid out
like the params (params, SMoE-Dropout's 'schedule', the decoding 'cache').

    scanned = scan_layout.to_layout(params, scanned=True)
    params == scan_layout.to_layout(scanned, scanned=False)     # bit for bit
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np

PyTree = Any

LAYERS_AXIS = 'layers'  # logical axis name of the stacked layer dimension
SCANNED_LAYERS = 'layers'  # module name of a scanned stack: encoder/layers/...
STACKS = ('encoder', 'decoder')
_PREFIX = 'layers_'


class LayoutError(ValueError):
  """A variables tree whose layer stacks are in neither layout (or in both at once)."""


def _layer_index(name: str) -> int | None:
  if name.startswith(_PREFIX) and name[len(_PREFIX):].isdigit():
    return int(name[len(_PREFIX):])
  return None


def _stack_layout(stack: Mapping[str, Any], where: str) -> str | None:
  """'scanned' | 'unscanned' | None (no layers) of one stack's subtree."""
  has_scanned = SCANNED_LAYERS in stack
  has_unscanned = any(_layer_index(k) is not None for k in stack)
  if has_scanned and has_unscanned:
    raise LayoutError(f'{where} holds both a scanned stack {where}/{SCANNED_LAYERS} and unscanned '
                      f'layers {where}/{_PREFIX}N: a tree is in one layout or the other.')
  return 'scanned' if has_scanned else 'unscanned' if has_unscanned else None


def layout_of(tree: Mapping[str, Any]) -> str | None:
  """'scanned' or 'unscanned' for a params-like tree; None when it has no layer stacks."""
  found = {s: _stack_layout(tree[s], s) for s in STACKS
           if isinstance(tree.get(s), Mapping)}
  kinds = {k for k in found.values() if k is not None}
  if len(kinds) > 1:
    raise LayoutError(f'the encoder and decoder stacks are in different layouts: {found}')
  return kinds.pop() if kinds else None


def _stack(leaves: list, path: str):
  shapes = {tuple(np.shape(x)) for x in leaves}
  if len(shapes) != 1:
    raise LayoutError(f'{path}: the layers hold different shapes {sorted(shapes)}; only layers '
                      'of one shape can be stacked.')
  first = leaves[0]
  if isinstance(first, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct((len(leaves),) + first.shape, first.dtype)
  if isinstance(first, jax.Array):
    return jax.numpy.stack(leaves)
  return np.stack([np.asarray(x) for x in leaves])


def _unstack(leaf, n: int, path: str) -> list:
  if np.ndim(leaf) == 0 or np.shape(leaf)[0] != n:
    raise LayoutError(f'{path}: a scanned variable of shape {tuple(np.shape(leaf))} has no '
                      f'leading layer axis of length {n}.')
  if isinstance(leaf, jax.ShapeDtypeStruct):
    return [jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype) for _ in range(n)]
  return [leaf[i] for i in range(n)]


def _as_dict(tree):
  return {k: _as_dict(v) for k, v in tree.items()} if isinstance(tree, Mapping) else tree


def scan_stack(stack: Mapping[str, Any], where: str = 'stack') -> dict:
  """One stack's subtree, unscanned -> scanned: layers_0..layers_{N-1} stacked into 'layers'."""
  stack = _as_dict(stack)
  indices = sorted(i for i in map(_layer_index, stack) if i is not None)
  if not indices:
    return stack
  if indices != list(range(len(indices))):
    raise LayoutError(f'{where}: layers {indices} are not layers_0..layers_{len(indices) - 1}; '
                      'a stack with missing layers cannot be scanned.')
  layers = [stack.pop(f'{_PREFIX}{i}') for i in indices]
  structure = jax.tree.structure(layers[0])
  for i, layer in enumerate(layers):
    if jax.tree.structure(layer) != structure:
      raise LayoutError(f'{where}/{_PREFIX}{i} holds other variables than {where}/{_PREFIX}0; '
                        'only layers with the same variables can be stacked.')
  paths = [jax.tree_util.keystr(p) for p, _ in
           jax.tree_util.tree_flatten_with_path(layers[0])[0]]
  leaves = [jax.tree.leaves(layer) for layer in layers]
  stacked = [_stack([ls[j] for ls in leaves], f'{where}/{_PREFIX}N{paths[j]}')
             for j in range(len(paths))]
  stack[SCANNED_LAYERS] = jax.tree.unflatten(structure, stacked)
  return stack


def unscan_stack(stack: Mapping[str, Any], where: str = 'stack') -> dict:
  """One stack's subtree, scanned -> unscanned: 'layers' split into layers_0..layers_{N-1}."""
  stack = _as_dict(stack)
  if SCANNED_LAYERS not in stack:
    return stack
  scanned = stack.pop(SCANNED_LAYERS)
  flat = jax.tree_util.tree_flatten_with_path(scanned)
  if not flat[0]:
    return stack
  n = int(np.shape(flat[0][0][1])[0]) if np.ndim(flat[0][0][1]) else 0
  per_leaf = [_unstack(x, n, f'{where}/{SCANNED_LAYERS}{jax.tree_util.keystr(p)}')
              for p, x in flat[0]]
  for i in range(n):
    stack[f'{_PREFIX}{i}'] = jax.tree.unflatten(flat[1], [ls[i] for ls in per_leaf])
  return stack


def to_layout(tree: Mapping[str, Any], scanned: bool) -> dict:
  """A params-like tree (nested dicts of arrays, numpy or jax, or ShapeDtypeStructs) in the
  scanned or the unscanned layout, whichever it is in now. Exact; a tree without layer stacks
  comes back as it is."""
  out = _as_dict(tree)
  convert = scan_stack if scanned else unscan_stack
  layout_of(out)  # refuses mixed layouts
  for s in STACKS:
    if isinstance(out.get(s), Mapping):
      out[s] = convert(out[s], s)
  return out


def variables_to_layout(variables: Mapping[str, Any], scanned: bool) -> dict:
  """Every collection of a model's variables ('params', 'schedule', ...) in one layout."""
  return {c: to_layout(v, scanned) if isinstance(v, Mapping) else v
          for c, v in variables.items()}
