"""A small LLaMA-style decoder in Flax NNX: RMSNorm, rotary attention, SwiGLU.

The architecture of the ZClip paper's model (its Table 4: pre-norm blocks,
RMSNorm with eps 1e-5, rotary position embeddings, SwiGLU feed-forward,
no biases), at a size set by `LlamaConfig`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Sizes of the decoder. The defaults make a ~0.8M-parameter byte model."""

  vocab_size: int = 256
  d_model: int = 128
  n_layers: int = 4
  n_heads: int = 4
  ffn_dim: int = 352  # about 8/3 * d_model, as in LLaMA, rounded to 32
  max_len: int = 128
  rope_theta: float = 10_000.0
  norm_eps: float = 1e-5
  tie_embeddings: bool = True
  init_std: float = 0.02

  def __post_init__(self):
    if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
      raise ValueError(
          f"`d_model` ({self.d_model}) must split into `n_heads` "
          f"({self.n_heads}) heads of even size")


def rope_tables(cfg: LlamaConfig) -> tuple[jax.Array, jax.Array]:
  """cos and sin of the rotary angles, each ``[max_len, head_dim // 2]``."""
  half = cfg.d_model // cfg.n_heads // 2
  inv_freq = cfg.rope_theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles = jnp.arange(cfg.max_len, dtype=jnp.float32)[:, None] * inv_freq
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates pairs (first half, second half) of each head's features.

  ``x`` is ``[batch, time, heads, head_dim]``; cos/sin are ``[time, half]``.
  """
  x1, x2 = jnp.split(x, 2, axis=-1)
  cos, sin = cos[:, None, :], sin[:, None, :]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


class Attention(nnx.Module):
  """Causal multi-head self-attention with rotary position embeddings."""

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    init = nnx.initializers.normal(cfg.init_std)
    # The output projection is scaled down with depth, as in GPT-2.
    out_init = nnx.initializers.normal(cfg.init_std / (2 * cfg.n_layers) ** .5)
    d = cfg.d_model
    self.n_heads = cfg.n_heads
    self.qkv = nnx.Linear(d, 3 * d, use_bias=False, kernel_init=init,
                          rngs=rngs)
    self.out = nnx.Linear(d, d, use_bias=False, kernel_init=out_init,
                          rngs=rngs)

  def __call__(self, x, cos, sin):
    b, t, d = x.shape
    q, k, v = jnp.split(self.qkv(x), 3, axis=-1)
    shape = (b, t, self.n_heads, d // self.n_heads)
    q = apply_rope(q.reshape(shape), cos[:t], sin[:t])
    k = apply_rope(k.reshape(shape), cos[:t], sin[:t])
    y = jax.nn.dot_product_attention(q, k, v.reshape(shape), is_causal=True)
    return self.out(y.reshape(b, t, d))


class SwiGLU(nnx.Module):
  """``down(silu(gate(x)) * up(x))``."""

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    init = nnx.initializers.normal(cfg.init_std)
    out_init = nnx.initializers.normal(cfg.init_std / (2 * cfg.n_layers) ** .5)
    d, f = cfg.d_model, cfg.ffn_dim
    self.gate = nnx.Linear(d, f, use_bias=False, kernel_init=init, rngs=rngs)
    self.up = nnx.Linear(d, f, use_bias=False, kernel_init=init, rngs=rngs)
    self.down = nnx.Linear(f, d, use_bias=False, kernel_init=out_init,
                           rngs=rngs)

  def __call__(self, x):
    return self.down(nnx.silu(self.gate(x)) * self.up(x))


class Block(nnx.Module):
  """Pre-norm residual block: attention, then SwiGLU."""

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    self.attn_norm = nnx.RMSNorm(cfg.d_model, epsilon=cfg.norm_eps, rngs=rngs)
    self.attn = Attention(cfg, rngs=rngs)
    self.mlp_norm = nnx.RMSNorm(cfg.d_model, epsilon=cfg.norm_eps, rngs=rngs)
    self.mlp = SwiGLU(cfg, rngs=rngs)

  def __call__(self, x, cos, sin):
    x = x + self.attn(self.attn_norm(x), cos, sin)
    return x + self.mlp(self.mlp_norm(x))


class Llama(nnx.Module):
  """Token ids ``[batch, time]`` to logits ``[batch, time, vocab]``."""

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = nnx.Embed(
        cfg.vocab_size, cfg.d_model,
        embedding_init=nnx.initializers.normal(cfg.init_std), rngs=rngs)
    self.blocks = nnx.List([Block(cfg, rngs=rngs)
                            for _ in range(cfg.n_layers)])
    self.norm = nnx.RMSNorm(cfg.d_model, epsilon=cfg.norm_eps, rngs=rngs)
    self.head = None if cfg.tie_embeddings else nnx.Linear(
        cfg.d_model, cfg.vocab_size, use_bias=False,
        kernel_init=nnx.initializers.normal(cfg.init_std), rngs=rngs)
    cos, sin = rope_tables(cfg)
    # Constants, not parameters: `wrt=nnx.Param` leaves them alone.
    self.rope_cos = nnx.Variable(cos)
    self.rope_sin = nnx.Variable(sin)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = self.embed(tokens)
    cos, sin = self.rope_cos[...], self.rope_sin[...]
    for block in self.blocks:
      x = block(x, cos, sin)
    x = self.norm(x)
    if self.head is None:
      return self.embed.attend(x)
    return self.head(x)


def num_params(model: nnx.Module) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def next_token_loss(model: Llama, tokens: jax.Array) -> jax.Array:
  """Mean cross-entropy of predicting ``tokens[:, 1:]`` from the prefix."""
  logits = model(tokens[:, :-1]).astype(jnp.float32)
  logp = jax.nn.log_softmax(logits)
  targets = tokens[:, 1:]
  return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], -1))
