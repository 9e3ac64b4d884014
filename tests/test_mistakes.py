"""What users get wrong is caught, or does what the docs say: none is silent.

A new user's run, as a script: a donated, jitted train step with
``skip_spikes(chain(zclip(), adamw))``, one bad batch (loss x500, gradient
x1000) and one NaN batch, ``stats()`` written to a CSV every step, then the
replay of that CSV. Around it, the slips that used to pass without a word:
the loss under another name or by position, ``stats`` of the parameters, a
number given to a factory by position.
"""

from __future__ import annotations

import collections
import csv
import functools
import inspect
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from references import SkipSpikesRef, tree_norm64
from transforms import TRANSFORMS, with_adamw

import optax_zclip
from optax_zclip import _cli
from optax_zclip._replay import _logs

T, BAD, NAN_STEP, WINDOW, SIGMA = 60, 30, 40, 16, 6.0


def _tx():
  return optax_zclip.skip_spikes(
      optax.chain(optax_zclip.zclip(), optax.adamw(1e-3)),
      window=WINDOW, sigma=SIGMA)


def _params():
  return {"w": jnp.zeros([64], jnp.float32), "b": jnp.zeros([8], jnp.float32)}


def _batch(t):
  """Step ``t``'s gradients and loss: ordinary, or the bad or NaN batch."""
  rng = np.random.default_rng(t)
  grads = {k: (0.3 * rng.standard_normal(v.shape)).astype(np.float32)
           for k, v in _params().items()}
  loss = 2.5 - 0.002 * t + 0.01 * rng.standard_normal()
  if t == BAD:
    grads = {k: 1000.0 * v for k, v in grads.items()}
    loss *= 500.0
  if t == NAN_STEP:
    grads["b"][3] = np.nan
  return grads, np.float32(loss)


@functools.partial(jax.jit, donate_argnums=(0, 1))
def _train_step(params, state, grads, loss):
  updates, state = _tx().update(grads, state, params, value=loss)
  return optax.apply_updates(params, updates), state, optax_zclip.stats(state)


# --------------------------------------------------------------------------
# The loss goes in as `value=`; another name or a position is refused.


def test_value_skips_the_loss_spike_that_the_reference_skips():
  params, state = _params(), _tx().init(_params())
  ref = SkipSpikesRef(window=WINDOW, sigma=SIGMA)
  for t in range(T):
    grads, loss = _batch(t)
    want = ref.step(tree_norm64(grads.values()), float(loss))
    params, state, s = _train_step(params, state, grads, loss)
    assert int(s["skip/skipped"]) == want["skip"], t
  assert ref.skips >= 2 and int(state.skip_count) == ref.skips


@pytest.mark.parametrize("name", ["loss", "losses", "train_loss", "Loss"])
def test_a_loss_under_another_name_is_refused(name):
  params = _params()
  state = _tx().init(params)
  grads, loss = _batch(0)
  step = jax.jit(lambda p, s, g, x: _tx().update(g, s, p, **{name: x}),
                 donate_argnums=(0, 1))
  with pytest.raises(TypeError, match=f"`{name}=` but no `value=`.*"
                     r"Pass value=loss \(with nnx.Optimizer, "
                     r"optimizer.update\(model, grads, value=loss\)\)"):
    step(params, state, grads, loss)


def test_value_none_lets_a_loss_through_to_another_transform():
  # A transform of the user's own that reads `loss=`: with `value=None`
  # the skip rule tests the norm alone and the inner transform gets it.
  def update(updates, state, params=None, *, loss=None, **_):
    return updates, jnp.asarray(loss, jnp.float32)

  inner = optax.GradientTransformationExtraArgs(
      lambda p: jnp.zeros([], jnp.float32), update)
  tx = optax_zclip.skip_spikes(inner, window=4)
  state = tx.init(_params())
  for t in range(6):
    grads, loss = _batch(t)
    _, state = tx.update(grads, state, value=None, loss=loss)
    assert float(state.inner_state) == loss
    assert float(state.loss_threshold) == math.inf
  assert not np.asarray(state.has_loss).any()


def test_a_positional_loss_is_refused_with_the_keyword_to_use():
  tx = _tx()
  params = _params()
  grads, loss = _batch(0)
  match = (r"1 positional argument after `params`.*"
           r"tx.update\(grads, state, params, value=loss\)")
  with pytest.raises(TypeError, match=match):
    tx.update(grads, tx.init(params), params, loss)
  with pytest.raises(TypeError, match=match):
    jax.jit(tx.update)(grads, tx.init(params), params, loss)


# --------------------------------------------------------------------------
# A CSV of stats() from that run, and its replay.


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
  """The run's CSV, as a logger writes it, and the float64 norms fed."""
  path = tmp_path_factory.mktemp("run") / "metrics.csv"
  params, state = _params(), _tx().init(_params())
  rows, norms, losses = [], [], []
  for t in range(T):
    grads, loss = _batch(t)
    norms.append(tree_norm64(grads.values()))
    losses.append(float(loss))
    params, state, s = _train_step(params, state, grads, loss)
    rows.append({"step": t, "loss": float(loss),
                 **{k: float(v) for k, v in s.items()}})
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  return path, rows, np.array(norms), losses


def test_inner_telemetry_repeats_the_last_taken_step_on_a_skipped_one(logged):
  # Documented (skip_spikes, the Skipping guide): the skip/ keys describe
  # every step, a clipping transform inside describes the last taken one.
  _, rows, norms, _ = logged
  for t in (BAD, NAN_STEP):
    assert rows[t]["skip/skipped"] == 1
    for key in ("zclip/grad_norm", "zclip/threshold", "zclip/count"):
      assert rows[t][key] == rows[t - 1][key], (t, key)
  np.testing.assert_allclose(rows[BAD]["skip/grad_norm"], norms[BAD],
                             rtol=1e-6)
  assert rows[BAD]["zclip/grad_norm"] < norms[BAD] / 500


def test_the_replay_reads_the_norm_of_every_step_and_says_so(logged, tmp_path,
                                                             capsys):
  path, _, norms, losses = logged
  log = _logs.read_log(str(path))
  assert log.norm_column == "skip/grad_norm" and log.loss_column == "loss"
  finite = np.isfinite(norms)
  assert not finite[NAN_STEP] and finite.sum() == T - 1
  np.testing.assert_allclose(log.norms[finite], norms[finite], rtol=1e-6)
  assert np.isnan(log.norms[NAN_STEP])

  out = tmp_path / "out"
  method = f"skip:window={WINDOW},sigma={SIGMA:g}"
  assert _cli.main(["replay", str(path), "--methods", method, "--out",
                    str(out), "--no-plot"]) == 0
  text = " ".join(capsys.readouterr().out.split())
  assert "the norms are column 'skip/grad_norm'" in text
  assert "the log also has 'zclip/grad_norm'" in text

  with open(out / "replay.csv") as f:
    replayed = list(csv.DictReader(f))
  np.testing.assert_allclose(float(replayed[BAD]["grad_norm"]), norms[BAD],
                             rtol=1e-6)
  # The replay's decisions are the float64 rule's on the logged series, and
  # the table counts every skipped step as clipped, the NaN one included.
  ref = SkipSpikesRef(window=WINDOW, sigma=SIGMA)
  skip = np.array([ref.step(float(g), x)["skip"]
                   for g, x in zip(log.norms, losses, strict=True)])
  assert skip[BAD] and skip[NAN_STEP]
  for column in ("skipped", "clipped"):
    np.testing.assert_array_equal(
        [int(r[f"{method}/{column}"]) for r in replayed], skip)
  row = next(x for x in text.split(method)[1:] if x.lstrip().startswith(
      f"{skip.sum()} ("))
  clipped, pct = row.split()[:2]
  assert clipped == str(skip.sum()) and pct == f"({100 * skip.mean():.1f}%)"
  # "by the cap" (skip has none), then the cuts, then the skipped column.
  assert row.split()[2] == "-" and row.split()[5] == str(skip.sum())


def test_two_unknown_norm_columns_are_refused_and_listed(tmp_path):
  path = tmp_path / "two.csv"
  path.write_text("step,encoder/grad_norm,decoder/grad_norm\n0,1.0,2.0\n")
  with pytest.raises(_logs.LogError,
                     match="2 columns could be the gradient norm "
                           r"\(encoder/grad_norm, decoder/grad_norm\); "
                           "choose one with --norm-column"):
    _logs.read_log(str(path))
  log = _logs.read_log(str(path), norm_column="decoder/grad_norm")
  assert log.norms.tolist() == [2.0] and not log.notes


# --------------------------------------------------------------------------
# stats() of something that holds no optimizer state.


@pytest.mark.parametrize("tree", [
    {"w": jnp.zeros(3)}, [jnp.zeros(3), jnp.ones(2)], jnp.zeros(3),
    {"params": {"dense": {"kernel": np.zeros((2, 2))}}}],
    ids=["dict", "list", "array", "numpy"])
def test_stats_of_parameters_is_a_type_error_saying_what_to_pass(tree):
  with pytest.raises(TypeError, match="holds no optimizer state.*Pass the "
                     "optimizer state"):
    optax_zclip.stats(tree)
  with pytest.raises(TypeError):
    jax.jit(optax_zclip.stats)(tree)


@pytest.mark.parametrize("make", [
    lambda: optax.adamw(1e-3),
    lambda: optax.sgd(0.1),
    lambda: optax.identity(),
    lambda: optax.MultiSteps(optax.adam(1e-3), 2),
    lambda: optax.inject_hyperparams(optax.adam)(learning_rate=1e-3),
    lambda: optax.apply_if_finite(optax.adam(1e-3), 3),
    lambda: optax.masked(optax.adam(1e-3), {"w": True, "b": False}),
], ids=["adamw", "sgd", "identity", "multisteps", "inject", "if_finite",
        "masked"])
def test_stats_of_an_optimizer_state_without_clipping_is_empty(make):
  state = make().init(_params())
  assert optax_zclip.stats(state) == {}
  assert optax_zclip.stats((_params(), state)) == {}
  assert optax_zclip.stats(state, default={"none": 0}) == {"none": 0}


@pytest.mark.parametrize("thing", [None, 3, 2.5, "opt_state", (None,),
                                   {"opt_state": None}],
                         ids=["None", "int", "float", "str", "tuple_of_None",
                              "dict_of_None"])
def test_stats_of_none_or_a_number_is_a_type_error_like_params(thing):
  # None is what an optimizer state not yet set holds.
  with pytest.raises(TypeError, match=r"^stats\(\) got .*, which holds no "
                     "optimizer state.*Pass the optimizer state"):
    optax_zclip.stats(thing)


def test_stats_of_an_empty_state_is_empty():
  # optax.chain()'s state and an empty mapping hold nothing to report.
  assert optax_zclip.stats(()) == {} and optax_zclip.stats({}) == {}


# --------------------------------------------------------------------------
# A state that is not the transform's own: refused at trace time, naming the
# transform, both states and the fix; never an AttributeError from inside.


def _own_and_wrong_states(name):
  """``(tx, params, extra, [(wrong state, words its message must hold)])``
  for a registry entry: the transform alone for a clipper, the wrapper around
  ``chain(<clipper>, adamw)`` for a wrapper."""
  e = TRANSFORMS[name]
  params = _params()
  if e.wrapper is None:
    tx, extra, fn = e.make(), {}, e.factory.__name__
  else:
    tx, extra = with_adamw(name), {"value": jnp.float32(2.5)}
    fn = e.wrapper.factory.__name__
  own = tx.init(params)
  cls = type(own).__name__
  common = [f"{fn}: update() got ", f"not the {cls} its init() builds",
            "Pass this transform's own state"]
  older = own._asdict()
  del older[own._fields[-1]]
  wrong = [
      # The slip: another optimizer's state.
      (optax.adam(1e-3).init(params),
       ["a tuple of (ScaleByAdamState, EmptyState)"]),
      (None, ["got None as its state"]),
      # Orbax without a target: dicts of the fields, today's or older.
      (own._asdict(), ["restored without a target",
                       "optax_zclip.migrate_state(restored, "
                       "tx.init(params))"]),
      (older, [f"lacks {cls}'s fields ['{own._fields[-1]}']",
               "optax_zclip.migrate_state(restored, tx.init(params))"]),
  ]
  if e.wrapper is None:
    # The chain's state given to the transform inside it.
    wrong.append((with_adamw(name).init(params),
                   [f"It holds a {cls} at state[0]"]))
  else:
    # The slip: skip_spikes added to a resumed run, handed the
    # state of the chain it wraps.
    inner = optax.chain(e.make(), optax.adamw(1e-2))
    inner_state = inner.init(params)
    wrong.append((inner_state,
                  [f"a tuple of ({type(inner_state[0]).__name__}, tuple)",
                   "optax_zclip.init_around(tx, inner_state)"]))
  return tx, params, extra, [(w, common + words) for w, words in wrong]


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_a_state_not_from_the_transforms_init_is_refused_with_the_fix(name):
  tx, params, extra, wrong = _own_and_wrong_states(name)
  grads = {k: jnp.ones_like(v) for k, v in params.items()}
  for state, words in wrong:
    for update in (tx.update, jax.jit(tx.update)):
      with pytest.raises(TypeError) as info:
        update(grads, state, params, **extra)
      message = str(info.value)
      for w in words:
        assert w in message, (w, message)
  # Its own state, and the same class rebuilt (a reloaded module), pass.
  own = tx.init(params)
  twin = collections.namedtuple(type(own).__name__, own._fields)(*own)
  for state in (own, twin):
    jax.jit(tx.update)(grads, state, params, **extra)


# --------------------------------------------------------------------------
# The factories take their numbers by name.

FACTORIES = {
    "zclip": ((), "alpha"),
    "adagc": ((), "lambda_rel"),
    "autoclip": ((), "percentile"),
    "skip_spikes": ((optax.sgd(1.0),), "window"),
}


@pytest.mark.parametrize("name", list(FACTORIES))
def test_a_number_by_position_is_refused_with_the_name_to_use(name):
  lead, first = FACTORIES[name]
  factory = getattr(optax_zclip, name)
  prefix = "inner, " if lead else ""
  with pytest.raises(TypeError,
                     match=re.escape(f"Write {name}({prefix}{first}=0.0003)")):
    factory(*lead, 3e-4)
  params = inspect.signature(factory).parameters
  kinds = {p.kind for n, p in params.items() if n != "inner"}
  assert kinds == {inspect.Parameter.KEYWORD_ONLY}


def test_only_inner_and_max_norm_are_positional():
  positional = {
      name: [n for n, p in inspect.signature(
          getattr(optax_zclip, name)).parameters.items()
             if p.kind is not inspect.Parameter.KEYWORD_ONLY]
      for name in ("zclip", "adagc", "autoclip", "skip_spikes",
                   "clip_by_global_norm")}
  assert positional == {"zclip": [], "adagc": [], "autoclip": [],
                        "skip_spikes": ["inner"],
                        "clip_by_global_norm": ["max_norm"]}
  # Optax's injection reads the real signature through the wrapper.
  tx = optax.inject_hyperparams(optax_zclip.zclip)(alpha=0.9, z_thresh=3.0)
  state = tx.init(_params())
  assert float(state.hyperparams["alpha"]) == np.float32(0.9)
