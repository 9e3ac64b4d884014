"""Test data and independent float64 NumPy models of the transforms.

The models follow the papers' and the reference code's procedures literally
(ZClip's buffer of warm-up norms, per-tensor Python loops for AdaGC, a list
of every norm and `np.percentile` for AutoClip, a deque of (loss, norm)
pairs for skip_spikes), with Python branches and
float64 throughout, rather than the package's branch-free vectorised forms,
so that agreement between the two means something.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import jax
import numpy as np

SHAPES = {"w1": (7, 5), "b1": (5,), "w2": (3, 2, 4)}
SPIKES = {6: 8.0, 31: 12.0, 32: 6.0, 50: 30.0, 66: 4.0, 81: 20.0}


def make_sequence(steps=90, seed=0, shapes=None):
  """Gradient trees whose global norm drifts, with multiplicative spikes."""
  rng = np.random.default_rng(seed)
  seq = []
  for t in range(steps):
    target = 1.5 + 0.8 * np.sin(t / 9) + 0.5 * np.exp(-t / 20)
    target *= np.exp(0.08 * rng.standard_normal())
    target *= SPIKES.get(t, 1.0)
    tree = {k: rng.standard_normal(s) for k, s in (shapes or SHAPES).items()}
    n = tree_norm64(tree.values())
    seq.append({k: (v * target / n).astype(np.float32)
                for k, v in tree.items()})
  return seq


def tree_norm64(leaves) -> float:
  """Global L2 norm of the leaves, in float64."""
  return math.sqrt(sum(float(np.sum(np.square(np.asarray(x, np.float64))))
                       for x in leaves))


@dataclass
class ZClipRef:
  """The authors' PyTorch ``ZClip`` on a stream of global norms, in float64."""

  alpha: float = 0.97
  z_thresh: float = 2.5
  max_grad_norm: float | None = 1.0
  eps: float = 1e-6
  warmup_steps: int = 25
  mode: str = "zscore"
  clip_option: str = "adaptive_scaling"
  clip_factor: float = 1.0
  skip_update_on_spike: bool = False
  max_consecutive_spikes: int | None = None  # the package's opt-in restart

  buffer: list = field(default_factory=list)
  initialized: bool = False
  mean: float = 0.0
  var: float = 0.0
  spikes: int = 0
  nonfinite: int = 0
  in_a_row: int = 0
  restarts: int = 0
  cap_count: int = 0  # steps the cap clipped, as the package's telemetry says

  def _by_cap(self, g: float, rule_limit: float) -> bool:
    """Whether the cap, not the z-score rule, clipped a finite norm ``g``:
    above the cap, with the cap below the limit the rule set."""
    capped = (self.max_grad_norm is not None and g > self.max_grad_norm
              and self.max_grad_norm < rule_limit)
    self.cap_count += capped
    return capped

  def step(self, g: float) -> dict:
    """Feeds one global norm; returns the scale applied and the decision."""
    if not math.isfinite(g):
      self.nonfinite += 1
      return dict(scale=1.0, spike=False, warmup=not self.initialized,
                  capped=False)

    if not self.initialized:
      self.buffer.append(g)
      if len(self.buffer) >= self.warmup_steps:
        n = len(self.buffer)
        self.mean = sum(self.buffer) / n
        self.var = sum((b - self.mean) ** 2 for b in self.buffer) / n
        self.initialized = True
        self.buffer = []
      scale = 1.0
      if self.max_grad_norm is not None:
        # torch.nn.utils.clip_grad_norm_: coefficient clamped at 1.
        scale = min(1.0, self.max_grad_norm / (g + self.eps))
      return dict(scale=scale, spike=False, warmup=True,
                  capped=self._by_cap(g, g))

    std = math.sqrt(self.var)
    z = (g - self.mean) / (std + self.eps)
    clip_val = None
    if self.mode == "percentile":
      if g > self.mean + self.z_thresh * std:
        clip_val = self.mean + self.z_thresh * std
    elif z > self.z_thresh:
      if self.clip_option == "adaptive_scaling":
        eta = z / self.z_thresh
        clip_val = (self.mean + self.z_thresh * std / eta) * self.clip_factor
      elif self.clip_option == "mean":
        clip_val = self.mean
      else:  # "max", the paper's variant
        clip_val = self.mean + self.z_thresh * std

    limit = g if clip_val is None else clip_val
    capped = self._by_cap(g, limit)
    if self.max_grad_norm is not None:
      limit = min(limit, self.max_grad_norm)
    scale = limit / (g + self.eps) if g > limit else 1.0

    spike = clip_val is not None
    self.spikes += spike
    if not (spike and self.skip_update_on_spike):
      x = clip_val if spike else g
      self.mean = self.alpha * self.mean + (1 - self.alpha) * x
      self.var = self.alpha * self.var + (1 - self.alpha) * (x - self.mean) ** 2
    self.in_a_row = self.in_a_row + 1 if spike else 0
    if (self.max_consecutive_spikes is not None
        and self.in_a_row >= self.max_consecutive_spikes):
      # Start over: the next warmup_steps norms seed the statistics anew.
      self.initialized, self.buffer = False, []
      self.mean = self.var = 0.0
      self.in_a_row = 0
      self.restarts += 1
    return dict(scale=scale, spike=spike, warmup=False, z=z, limit=limit,
                capped=capped)

  def running_stats(self) -> tuple[float, float]:
    """(mean, var) as the package reports them, warm-up included."""
    if self.initialized:
      return self.mean, self.var
    if not self.buffer:
      return 0.0, 0.0
    b = np.asarray(self.buffer, np.float64)
    return float(b.mean()), float(b.var())



def leaf_norm64(x) -> float:
  return math.sqrt(float(np.sum(np.square(np.asarray(x, np.float64)))))


@dataclass
class AdaGCRef:
  """AdaGC as its authors released it, tensor by tensor, in float64.

  A transcription of the rule in the authors' Megatron-LM patch (class
  ``AdaGC``, method ``clip_by_norm``, in ``megatron/optimizer/clip_grads.py``
  of github.com/lishuai-97/AdaGC), with Python branches where the package
  uses `jnp.where`:

  * Steps are numbered from 1; step ``t`` is a warm-up step while ``t <=
    warmup_steps``. A warm-up step multiplies every tensor by
    ``max_grad_norm / (G + eps)`` when that is below 1 (``G`` the global
    norm), then records each tensor's norm after that scaling: the first
    record seeds the tensor's reference norm, later ones replace it only
    when smaller.
  * After warm-up a tensor with no reference yet takes its own norm as one.
    A tensor whose norm ``n`` exceeds ``lambda_rel * ref`` is multiplied by
    ``lambda_rel * ref / (n + eps)`` and counts as ``lambda_rel * ref`` in
    the average; any other tensor counts as ``n``. Then ``ref <- beta * ref
    + (1 - beta) * counted``.

  Plus the package's documented extras (none of them reachable with the
  authors' finite, non-zero gradients):

  * A step with a NaN or Inf global norm is not a step: it gets no number
    and records nothing. During warm-up it passes through; afterwards its
    finite tensors are scaled as above without updating ``ref``.
  * A tensor of norm 0 records nothing and passes through.
  * ``max_grad_norm=None``: warm-up steps are not scaled.

  ``gamma[i]`` is ``inf`` while tensor i has no reference, as in the
  package's state; ``clipped[i]`` says whether the last step scaled tensor i
  down.
  """

  lambda_rel: float = 1.04
  beta: float = 0.99
  warmup_steps: int = 100
  max_grad_norm: float | None = 1.0
  eps: float = 1e-6

  gamma: list | None = None
  steps: int = 0  # finite steps taken
  nonfinite: int = 0
  clipped: list = field(default_factory=list)
  capped: bool = False  # whether the cap clipped the last step (warm-up)
  cap_count: int = 0

  def _after_warmup(self, i: int, n: float) -> tuple[float, float, bool]:
    """(factor, new reference, clipped?) of tensor i after warm-up."""
    ref = n if math.isinf(self.gamma[i]) else self.gamma[i]
    limit = self.lambda_rel * ref
    if n > limit:
      factor, counted = limit / (n + self.eps), limit
    else:
      factor, counted = 1.0, n
    return factor, self.beta * ref + (1 - self.beta) * counted, n > limit

  def step(self, leaves) -> list:
    """Feeds one step's tensors; returns the factor applied to each."""
    norms = [leaf_norm64(x) for x in leaves]
    total = math.sqrt(sum(n * n for n in norms))
    if self.gamma is None:
      self.gamma = [math.inf] * len(norms)
    warm = self.steps + 1 <= self.warmup_steps  # this step's number
    self.capped = False
    if not math.isfinite(total):
      self.nonfinite += 1
      factors = [1.0] * len(norms)
      self.clipped = [False] * len(norms)
      if not warm:
        for i, n in enumerate(norms):
          if math.isfinite(n) and n > 0:
            factors[i], _, self.clipped[i] = self._after_warmup(i, n)
      return factors
    self.steps += 1
    if warm:
      coeff = 1.0
      if self.max_grad_norm is not None:
        c = self.max_grad_norm / (total + self.eps)
        if c < 1.0:
          coeff = c
      self.clipped = [coeff < 1.0 and n > 0 for n in norms]
      self.capped = coeff < 1.0 and total > 0
      self.cap_count += self.capped
      for i, n in enumerate(norms):
        if n == 0:
          continue
        if math.isinf(self.gamma[i]) or coeff * n < self.gamma[i]:
          self.gamma[i] = coeff * n
      return [coeff] * len(norms)
    factors = [1.0] * len(norms)
    self.clipped = [False] * len(norms)
    for i, n in enumerate(norms):
      if n == 0:
        continue
      factors[i], self.gamma[i], self.clipped[i] = self._after_warmup(i, n)
    return factors


@dataclass
class AutoClipRef:
  """AutoClip (arXiv 2007.14469): every finite norm kept in a list."""

  percentile: float = 10.0
  window: int = 1024
  norms: list = field(default_factory=list)
  nonfinite: int = 0

  def step(self, g: float) -> tuple[float, float]:
    """Feeds one global norm; returns (scale, threshold)."""
    if not math.isfinite(g):
      self.nonfinite += 1
      thr = (float(np.percentile(self.norms[-self.window:], self.percentile))
             if self.norms else math.inf)
      return 1.0, thr
    self.norms.append(g)
    thr = float(np.percentile(self.norms[-self.window:], self.percentile))
    return (thr / g if g > thr else 1.0), thr


@dataclass
class ClipByGlobalNormRef:
  """A fixed global-norm clip (Pascanu et al., 2013) and its telemetry.

  A norm above ``max_norm`` is brought down to it (``scale = max_norm /
  norm``, no eps); any other finite norm passes (``max_norm=None``: every
  one). A NaN or Inf norm passes through untouched and is counted apart, not
  as a step.
  """

  max_norm: float | None = 1.0
  count: int = 0
  grad_norm: float = 0.0
  clipped_norm: float = 0.0
  clipped_count: int = 0
  nonfinite_count: int = 0

  @property
  def threshold(self) -> float:
    return math.inf if self.max_norm is None else float(self.max_norm)

  def step(self, g: float) -> dict:
    """Feeds one global norm; returns the scale applied and the decision."""
    self.grad_norm = g
    scale = 1.0
    if not math.isfinite(g):
      self.nonfinite_count += 1
    else:
      self.count += 1
      if g > self.threshold:
        scale = self.threshold / g
        self.clipped_count += 1
    self.clipped_norm = g * scale
    return dict(scale=scale, clipped=scale < 1.0)


@dataclass
class SkipSpikesRef:
  """skip_spikes' rule on a stream of (loss, norm) pairs, in float64.

  ``history`` is a deque of the last ``window`` finite pairs; a step updated
  without a loss records ``(None, norm)``, and the loss test only reads the
  losses that are there. A test needs two values for a sample standard
  deviation.
  """

  window: int = 128
  sigma: float = 6.0
  history: deque = field(init=False)
  skips: int = 0
  nonfinite: int = 0

  def __post_init__(self):
    self.history = deque(maxlen=self.window)

  def _test(self, x: float, values: list) -> tuple[bool, float]:
    """(outlier, threshold) of the one-sided test of ``x`` on ``values``."""
    if len(values) + 1 < max(2, self.window // 2) or len(values) < 2:
      return False, math.inf
    mean = math.fsum(values) / len(values)
    var = math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1)
    std = math.sqrt(var)
    return x - mean > self.sigma * std, mean + self.sigma * std

  def step(self, norm: float, loss: float | None = None) -> dict:
    """Feeds one step; returns whether it is skipped, and the thresholds."""
    norm_out, norm_thr = self._test(norm, [g for _, g in self.history])
    loss_out, loss_thr = False, math.inf
    if loss is not None:
      loss_out, loss_thr = self._test(
          loss, [x for x, _ in self.history if x is not None])
    out = dict(loss_threshold=loss_thr, norm_threshold=norm_thr)
    if not math.isfinite(norm) or (loss is not None
                                   and not math.isfinite(loss)):
      self.skips += 1
      self.nonfinite += 1
      return dict(out, skip=True, nonfinite=True)
    skip = norm_out or loss_out
    self.skips += skip
    self.history.append((loss, norm))
    return dict(out, skip=skip, nonfinite=False, loss_out=loss_out,
                norm_out=norm_out)


def adamw64(grads_seq, params, lr, b1=0.9, b2=0.999, eps=1e-8, wd=1e-4):
  """Plain float64 AdamW, as in Loshchilov & Hutter, for comparison."""
  m = {k: np.zeros_like(v, np.float64) for k, v in params.items()}
  v = {k: np.zeros_like(x, np.float64) for k, x in params.items()}
  p = {k: np.asarray(x, np.float64) for k, x in params.items()}
  for t, g in enumerate(grads_seq, start=1):
    for k in p:
      m[k] = b1 * m[k] + (1 - b1) * g[k]
      v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
      mh, vh = m[k] / (1 - b1**t), v[k] / (1 - b2**t)
      p[k] = p[k] - lr * (mh / (np.sqrt(vh) + eps) + wd * p[k])
  return p


def run_without_host_transfer(update, state, seq):
  """Runs jitted ``update`` over ``seq`` under ``transfer_guard("disallow")``.

  The gradients and state are put on the device first, so any transfer
  inside the step (a host sync) raises. Returns the outputs, on the host,
  and the final state.
  """
  step = jax.jit(update)
  seq, state = jax.device_put(seq), jax.device_put(state)
  outs = []
  with jax.transfer_guard("disallow"):
    for grads in seq:
      out, state = step(grads, state)
      outs.append(out)
  return jax.device_get(outs), state


# The default sequence: warm-up, drift, and six spikes (two back to back).
SEQ = make_sequence()


def assert_same_step(t, out, out1, state, state1):
  """Step ``t`` of a multi-device run equals the one-device run's.

  The updates ``out`` and every leaf of ``state`` against ``out1`` and
  ``state1``, to 1e-4 relative: the devices sum the squares in another
  order, nothing more.
  """
  for k in out:
    np.testing.assert_allclose(out[k], out1[k], rtol=1e-4, atol=1e-8,
                               err_msg=f"step {t} leaf {k}")
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(state)[0],
                          jax.tree.leaves(state1), strict=True):
    np.testing.assert_allclose(
        a, b, rtol=1e-4, atol=1e-7,
        err_msg=f"step {t} {jax.tree_util.keystr(path)}")


def to_host(tree):
  """Every leaf of ``tree`` as a NumPy array."""
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def one_device_run(tx, seq):
  """``(updates, state)`` on the host after each step of ``seq``, jitted on
  one device: what the multi-device runs must equal."""
  step = jax.jit(tx.update)
  state = tx.init(seq[0])
  rows = []
  for grads in seq:
    out, state = step(grads, state)
    rows.append(to_host((out, state)))
  return rows
