"""T5-family hyperparameters and the description of where adapters are injected.

One frozen dataclass covers original T5 (ReLU FFN, tied embeddings), T5.1.1 / mT5 / Flan-T5 (gated-GELU
FFN, untied embeddings) and any size in between.

Adapter sites
-------------
Every projection of the network is an `AdaptedDense`; a *site* names one group of projections:

  encoder/attention/{query,key,value,out}
  decoder/self_attention/{query,key,value,out}
  decoder/encoder_decoder_attention/{query,key,value,out}
  {encoder,decoder}/mlp/{wi,wo}          ('wi' covers wi_0/wi_1 of a gated FFN)

`adapter_targets` holds glob patterns (`fnmatch`) over site names; every matching site gets
`adapter`, all others get `AdapterConfig()` (kind 'none': the plain frozen projection).
`adapter_overrides` gives per-pattern configs (first match wins) when sites need different
adapters, e.g. `(('decoder/*', AdapterConfig(kind='lora', rank=8)),)`.

Common choices (the default is LoRA's classic query+value in every attention block):

  adapter_targets=('*/query', '*/value')                    # q, v of all three attention kinds
  adapter_targets=ATTENTION_SITES                           # q, k, v, o everywhere
  adapter_targets=('encoder/attention/*',)                  # encoder self-attention only
  adapter_targets=('*/mlp/*',)                              # FFN only
  adapter_targets=('*',)                                    # every projection

In gin: `T5Config.adapter = @AdapterConfig()` and `T5Config.adapter_targets = ('*/query', '*/value')`.
"""
from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any, Collection, Mapping

import gin
import jax.numpy as jnp

from sira_jax.adapters import AdapterConfig

_ATTN_PROJ = ('query', 'key', 'value', 'out')
ENCODER_ATTENTION_SITES = tuple(f'encoder/attention/{p}' for p in _ATTN_PROJ)
DECODER_SELF_ATTENTION_SITES = tuple(f'decoder/self_attention/{p}' for p in _ATTN_PROJ)
CROSS_ATTENTION_SITES = tuple(f'decoder/encoder_decoder_attention/{p}' for p in _ATTN_PROJ)
ATTENTION_SITES = ENCODER_ATTENTION_SITES + DECODER_SELF_ATTENTION_SITES + CROSS_ATTENTION_SITES
MLP_SITES = ('encoder/mlp/wi', 'encoder/mlp/wo', 'decoder/mlp/wi', 'decoder/mlp/wo')
ALL_SITES = ATTENTION_SITES + MLP_SITES

# Names accepted in `mlp_activations`. 'gelu' follows flax/T5X (tanh approximation, what T5.1.1,
# mT5 and Flan-T5 were trained with, = HF 'gelu_new'); 'gelu_exact' is the erf form (HF 'gelu').
ACTIVATIONS = ('relu', 'gelu', 'gelu_new', 'gelu_tanh', 'gelu_exact', 'silu', 'swish', 'linear')

# `T5Config.remat_policy` values (sira_jax.t5.network.remat_policy says what each saves).
REMAT_POLICIES = ('none', 'minimal', 'full')

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


def as_dtype(d: Any):
  """'float32' | 'bfloat16' | a jnp dtype -> jnp dtype."""
  if isinstance(d, str):
    if d not in _DTYPES:
      raise ValueError(f'unknown dtype {d!r}; expected one of {sorted(_DTYPES)}')
    return _DTYPES[d]
  return d


@gin.configurable
@dataclasses.dataclass(frozen=True)
class T5Config:
  """Hyperparameters of a T5 encoder-decoder (defaults: T5.1.1-small / Flan-T5-small shapes).

  Attributes:
    vocab_size: embedding rows (32128 for T5/Flan-T5, 250112 for mT5).
    d_model: width of the residual stream ('embed').
    d_ff: FFN hidden width ('mlp').
    num_heads, d_kv: attention heads and per-head width (q/k/v kernels are [d_model, heads*d_kv]).
    num_encoder_layers, num_decoder_layers: stack depths.
    dropout_rate: dropout on embeddings, sublayer outputs, attention weights and FFN hidden.
    mlp_activations: one entry per input projection of the FFN; ('relu',) -> `wi` (original T5),
      ('gelu', 'linear') -> gated `wi_0`, `wi_1` (T5.1.1, mT5, Flan-T5).
    tie_word_embeddings: decoder logits via the token embedding (no `logits_dense` param).
    scale_logits: multiply the final decoder output by d_model**-0.5 before the logits projection;
      None (default) = `tie_word_embeddings`, the T5/T5X/HF convention. Only checkpoints saved by
      transformers>=5 as MT5 (tied, unscaled) need an explicit False.
    relative_attention_num_buckets, relative_attention_max_distance: T5 relative position buckets.
    layer_norm_epsilon: RMSNorm epsilon.
    dtype: activation dtype ('float32' or 'bfloat16'); params stay `param_dtype`.
    param_dtype: dtype of parameters.
    adapter: the AdapterConfig used at every site matched by `adapter_targets`.
    adapter_targets: fnmatch patterns over site names (see module docstring).
    adapter_overrides: ((pattern, AdapterConfig), ...), checked before `adapter_targets`.
    freeze_base: base kernels get stop_gradient (fine-tuning); False for pretraining.
    float32_attention_logits: compute q.k and softmax in float32 whatever `dtype` is.
    scan_layers: run each layer stack as one `nn.scan` over stacked layer params (params
      'encoder/layers/...' with a leading 'layers' axis instead of 'encoder/layers_N/...'): one
      layer compiled instead of N, T5X's recipe for XL/XXL. Same function and numbers;
      `sira_jax.t5.scan_layout` converts params between the two layouts.
    remat_policy: rematerialisation of each layer in the backward pass: 'none' (keep every
      activation), 'minimal' (keep the weight matmuls, recompute the rest), 'full' (keep only
      each layer's input). Memory for compute; values and gradients unchanged.
  """
  vocab_size: int = 32128
  d_model: int = 512
  d_ff: int = 1024
  num_heads: int = 6
  d_kv: int = 64
  num_encoder_layers: int = 8
  num_decoder_layers: int = 8
  dropout_rate: float = 0.1
  mlp_activations: tuple[str, ...] = ('gelu', 'linear')
  tie_word_embeddings: bool = False
  scale_logits: bool | None = None
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  dtype: Any = 'float32'
  param_dtype: Any = 'float32'
  adapter: AdapterConfig = AdapterConfig()
  adapter_targets: tuple[str, ...] = ('*/query', '*/value')
  adapter_overrides: tuple[tuple[str, AdapterConfig], ...] = ()
  freeze_base: bool = True
  float32_attention_logits: bool = True
  scan_layers: bool = False
  remat_policy: str = 'none'

  def __post_init__(self):
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f'unknown remat_policy {self.remat_policy!r}; expected one of '
                       f'{REMAT_POLICIES}')
    for a in self.mlp_activations:
      if a not in ACTIVATIONS:
        raise ValueError(f'unknown activation {a!r} in mlp_activations; expected one of {ACTIVATIONS}')
    if not self.mlp_activations:
      raise ValueError('mlp_activations must name at least one activation')
    # Tuples may arrive as lists from gin/json: normalise so the dataclass stays hashable.
    object.__setattr__(self, 'mlp_activations', tuple(self.mlp_activations))
    object.__setattr__(self, 'adapter_targets', tuple(self.adapter_targets))
    object.__setattr__(self, 'adapter_overrides', tuple(tuple(o) for o in self.adapter_overrides))
    as_dtype(self.dtype), as_dtype(self.param_dtype)

  @property
  def logits_scaled(self) -> bool:
    return self.tie_word_embeddings if self.scale_logits is None else bool(self.scale_logits)

  @property
  def activation_dtype(self):
    return as_dtype(self.dtype)

  @property
  def weight_dtype(self):
    return as_dtype(self.param_dtype)

  def adapter_for(self, site: str) -> AdapterConfig:
    """The AdapterConfig of one site (see module docstring); kind 'none' where nothing matches."""
    if site not in ALL_SITES:
      raise ValueError(f'unknown adapter site {site!r}; sites are {ALL_SITES}')
    for pattern, cfg in self.adapter_overrides:
      if fnmatch.fnmatchcase(site, pattern):
        return cfg
    if any(fnmatch.fnmatchcase(site, p) for p in self.adapter_targets):
      return self.adapter
    return AdapterConfig(kind='none')  # explicit: immune to an unscoped gin binding

  def adapted_sites(self) -> dict[str, AdapterConfig]:
    """{site: AdapterConfig} for every site whose adapter kind is not 'none'."""
    out = {s: self.adapter_for(s) for s in ALL_SITES}
    return {s: c for s, c in out.items() if c.kind != 'none'}

  def replace(self, **kw) -> 'T5Config':
    return dataclasses.replace(self, **kw)

  def architecture(self) -> dict[str, Any]:
    """The fields that define the function of the base weights: {field: value}, comparable.

    `scale_logits` is the effective choice (`logits_scaled`) and activation aliases are
    canonical ('gelu_new' -> 'gelu'), so two configs computing the same function compare equal.
    """
    out = {f: getattr(self, f) for f in ARCHITECTURE_FIELDS}
    out['scale_logits'] = self.logits_scaled
    out['mlp_activations'] = tuple(_CANONICAL_ACTIVATION.get(a, a) for a in self.mlp_activations)
    return out


# Fields that change what the stored base weights compute: a checkpoint fixes them. Every other
# field (adapters, freezing, dropout, dtypes, attention-logit precision, layer scanning and
# rematerialisation) may be set freely.
ARCHITECTURE_FIELDS = (
    'vocab_size', 'd_model', 'd_ff', 'num_heads', 'd_kv', 'num_encoder_layers',
    'num_decoder_layers', 'mlp_activations', 'tie_word_embeddings', 'scale_logits',
    'relative_attention_num_buckets', 'relative_attention_max_distance', 'layer_norm_epsilon')
_CANONICAL_ACTIVATION = {'gelu_new': 'gelu', 'gelu_tanh': 'gelu', 'swish': 'silu'}


class ArchitectureMismatchError(ValueError):
  """A configured architecture field disagrees with the checkpoint's."""


def with_checkpoint_architecture(cfg: T5Config, checkpoint: Mapping[str, Any], *, source: str,
                                 configured: Collection[str] | None = None) -> T5Config:
  """`cfg` with the architecture a checkpoint stores; refuses any configured disagreement.

  Args:
    cfg: the configured model (e.g. from gin).
    checkpoint: the architecture fields the checkpoint determines ({field: value}, as
      `T5Config.architecture()` gives them; fields the checkpoint does not record are absent).
    source: the checkpoint, for the error message.
    configured: the fields the user set explicitly (e.g. bound in gin); None = every field.
      A configured field must equal the checkpoint's value; an unset one is taken from it.
  Raises:
    ArchitectureMismatchError naming every disagreeing field with both values.
  """
  mine = cfg.architecture()
  unknown = set(checkpoint) - set(ARCHITECTURE_FIELDS)
  if unknown:
    raise ValueError(f'internal: not architecture fields: {sorted(unknown)}')
  diff = [f'{f}: configured {mine[f]!r} vs checkpoint {v!r}' for f, v in checkpoint.items()
          if (configured is None or f in configured) and _norm(mine[f]) != _norm(v)]
  if diff:
    raise ArchitectureMismatchError(
        f'the configured model does not match the checkpoint {source}: ' + '; '.join(diff) +
        '. Drop these settings (the architecture is read from the checkpoint) or use a '
        'checkpoint of the configured architecture.')
  return cfg.replace(**{f: tuple(v) if f == 'mlp_activations' else v
                        for f, v in checkpoint.items()})


def _norm(v):
  if isinstance(v, (list, tuple)):
    return tuple(_CANONICAL_ACTIVATION.get(a, a) for a in v)
  if isinstance(v, float):
    return float(v)
  return v


def small_test_config(**kw) -> T5Config:
  """A tiny config for tests (vocab 64, d_model 16, 2+2 layers)."""
  base = dict(vocab_size=64, d_model=16, d_ff=32, num_heads=2, d_kv=8, num_encoder_layers=2,
              num_decoder_layers=2, dropout_rate=0.0, relative_attention_num_buckets=8,
              relative_attention_max_distance=16)
  base.update(kw)
  return T5Config(**base)
