"""Step-by-step parity with the authors' PyTorch ZClip (PyPI ``zclip`` 1.0.0).

Skipped unless both ``torch`` and ``zclip`` import; neither is a dependency
of this package. CI's README and floor jobs install them (on Python 3.11);
its newest-Python job (``.ci/newest``) does not, so it skips there. To run it,
in a virtual environment of its own::

  # in a virtual environment of its own, activated (not your JAX one)
  pip install torch==2.13.0 zclip==1.0.0 pytest -e .
  python -m pytest tests/test_torch_parity.py

The same stream of gradients, with injected spikes, goes through the
reference ``ZClip.step`` (on a module holding those gradients) and through
`optax_zclip.zclip`, for every mode and option; the clipping scale, the
global norm and, once the reference has left its warm-up, the statistics'
mean and variance must agree at every step.
"""

import itertools

import jax
import numpy as np
import pytest

import optax_zclip

# The reason says why, not only what failed to import: the CPU build of
# torch that CI installs is a Python 3.11 wheel, and on any other Python pip
# would fetch a CUDA build of several GB, so the newest-Python job has none.
_WHY = ("needs PyTorch and the authors' ZClip (pip install torch==2.13.0 "
        "zclip==1.0.0), not dependencies: CI installs them on Python 3.11 "
        "(the README and floor jobs), not in the newest-Python job")
torch = pytest.importorskip("torch", reason=_WHY)
reference = pytest.importorskip("zclip", reason=_WHY)

SHAPES = [(8, 16), (16,), (4, 4, 3)]
STEPS, WARMUP = 80, 10
# Steps whose gradients are multiplied up: a mild and a large spike after
# the warm-up, a spike right after it, and two in a row.
SPIKES = {4: 3.0, 12: 8.0, 30: 4.0, 41: 40.0, 55: 6.0, 56: 6.0, 70: 15.0}
TOL = 1e-4


def _stream():
  """``STEPS`` lists of float32 gradients with a global norm near 0.6."""
  rng = np.random.default_rng(0)
  n = sum(int(np.prod(s)) for s in SHAPES)
  out = []
  for step in range(STEPS):
    level = 0.6 * np.exp(0.15 * rng.standard_normal())
    level *= SPIKES.get(step, 1.0)
    out.append([(rng.standard_normal(s) * level / n ** 0.5)
                .astype(np.float32) for s in SHAPES])
  return out


def _norm(leaves):
  return float(np.sqrt(sum(np.sum(np.square(x, dtype=np.float64))
                           for x in leaves)))


CASES = [
    dict(mode=mode, clip_option=option, clip_factor=factor,
         skip_update_on_spike=skip, max_grad_norm=cap)
    for (mode, option), factor, skip, cap in itertools.product(
        [("zscore", "adaptive_scaling"), ("zscore", "mean"),
         ("percentile", "adaptive_scaling")],
        [1.0, 0.7], [False, True], [None, 1.0])]


@pytest.mark.parametrize("kw", CASES, ids=lambda kw: "-".join(
    f"{v}" for v in kw.values()))
def test_same_scale_and_statistics_as_the_reference(kw):
  ref = reference.ZClip(warmup_steps=WARMUP, **kw)
  params = torch.nn.ParameterList(
      [torch.nn.Parameter(torch.zeros(s)) for s in SHAPES])
  tx = optax_zclip.zclip(warmup_steps=WARMUP, **kw)
  state = tx.init([np.zeros(s, np.float32) for s in SHAPES])
  update = jax.jit(tx.update)

  spikes = 0
  for step, grads in enumerate(_stream()):
    for p, g in zip(params, grads, strict=True):
      p.grad = torch.from_numpy(g.copy())  # ZClip clips in place
    ref_norm = ref.step(params)
    ref_scale = _norm([p.grad.numpy() for p in params]) / _norm(grads)

    out, state = update(grads, state)
    scale = _norm([np.asarray(x) for x in out]) / _norm(grads)
    where = f"step {step}, {kw}"
    np.testing.assert_allclose(float(state.grad_norm), ref_norm,
                               rtol=1e-5, err_msg=where)
    np.testing.assert_allclose(scale, ref_scale, rtol=TOL, atol=TOL,
                               err_msg=where)
    # The reference exposes its statistics once its warm-up buffer is full.
    if ref.initialized:
      np.testing.assert_allclose(float(state.mean), ref.mean, rtol=TOL,
                                 err_msg=where)
      np.testing.assert_allclose(float(state.var), ref.var, rtol=TOL,
                                 atol=TOL * ref.mean ** 2, err_msg=where)
    spikes += ref_scale < 1 - TOL
  # The stream must exercise clipping, not only agree on no-ops.
  assert spikes >= 3, kw
