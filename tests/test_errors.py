"""Every bad hyperparameter of every public function: a `ValueError` naming it.

The table of bad values, `bad_values.TABLE`, lists each argument of every
public function with what it allows and bad values for every constraint;
each must raise `ValueError` at call (build) time, with the argument's name
in backticks, and the table must cover every argument. Values at the edges
of what is allowed must be accepted and work; traced values, non-float
leaves and mistakes that pass every range check are refused as the
documentation says. `errors_markdown` renders the table, with the messages
obtained by calling the functions, as the "Errors" section of the
documentation page ``docs/guides/errors.md``; a test checks that the page
holds exactly that, and ``python tests/test_errors.py`` rewrites it.
"""

from __future__ import annotations

import inspect
import math
import pathlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import transforms
from bad_values import (
  INF,
  INT32_MAX,
  LOSSES,
  METRICS,
  ROUNDS_TO_0,
  TABLE,
  assert_refused,
  call_with,
  cases,
)
from references import make_sequence, tree_norm64

import optax_zclip


@pytest.mark.parametrize("fn,arg,value", cases())
def test_bad_value_raises_a_value_error_naming_the_argument(fn, arg, value):
  assert_refused(fn, arg, value)


def test_the_table_covers_every_argument_of_every_public_function():
  # Every public function but the telemetry readers, which take any state,
  # replay, which takes a logged series and builds its methods with the
  # factories above (its input errors are tested in test_replay*.py), and
  # those that take states: init_around (test_skip.py) and migrate_state.
  public = {name for name in optax_zclip.__all__
            if inspect.isfunction(getattr(optax_zclip, name))} - {
                "stats", "loggable_state", "replay", "init_around",
                "migrate_state"}
  covered = {}
  for fns, arg, _, _ in TABLE:
    for fn in (fns,) if isinstance(fns, str) else fns:
      covered.setdefault(fn, set()).add(arg)
  assert set(covered) == public
  for fn in public:
    params = set(inspect.signature(getattr(optax_zclip, fn)).parameters)
    # axis_name takes any mesh axis name (or names); jax checks it.
    assert covered[fn] == params - {"axis_name"}, fn


# The largest float32 below 1.
BELOW_1 = float(np.nextafter(np.float32(1), np.float32(0)))

GOOD = [
    ("zclip", dict(alpha=np.float32(0.5), z_thresh=np.array(0.1),
                   max_grad_norm=None, eps=0, warmup_steps=np.int64(1),
                   mode="Percentile", clip_option="MAX", clip_factor=5,
                   skip_update_on_spike=np.bool_(True))),
    ("zclip", dict(alpha=1e-9, z_thresh=1e9, max_grad_norm=1e-30,
                   eps=0.0, warmup_steps=np.array(10**9),
                   skip_update_on_spike=np.array(False))),
    ("zclip", dict(alpha=BELOW_1, max_grad_norm=INF, warmup_steps=INT32_MAX,
                   eps=ROUNDS_TO_0, max_consecutive_spikes=INT32_MAX)),
    ("zclip", dict(alpha=jnp.asarray(0.5), z_thresh=jnp.asarray(2.0),
                   max_grad_norm=jnp.asarray(INF), eps=jnp.asarray(0.0),
                   warmup_steps=jnp.asarray(3), clip_factor=jnp.asarray(2),
                   skip_update_on_spike=jnp.asarray(True))),
    ("adagc", dict(lambda_rel=1e-9, beta=0.999999, warmup_steps=1,
                   max_grad_norm=None, eps=0)),
    ("adagc", dict(beta=BELOW_1, max_grad_norm=INF,
                   warmup_steps=INT32_MAX, lambda_rel=jnp.asarray(1.05))),
    ("autoclip", dict(percentile=0, window=1)),
    ("autoclip", dict(percentile=np.float64(100.0), window=np.int32(7))),
    ("autoclip", dict(percentile=jnp.asarray(100.0))),
    ("clip_by_global_norm", dict(max_norm=None)),
    ("clip_by_global_norm", dict(max_norm=INF)),
    ("clip_by_global_norm", dict(max_norm=np.float32(1e-30))),
    ("skip_spikes", dict(inner=optax.identity(), window=2, sigma=1e-9,
                         loss_test=np.bool_(False))),
    ("skip_spikes", dict(inner=optax.adam(1e-3), window=np.int64(10**4),
                         sigma=np.float32(1e9), loss_test=True)),
]


@pytest.mark.parametrize("fn,kwargs", GOOD)
def test_edge_values_are_accepted_and_work(fn, kwargs):
  tx = getattr(optax_zclip, fn)(**kwargs)
  grads = {"w": jnp.array([3.0, 4.0])}
  extra = {"value": 2.5} if fn == "skip_spikes" else {}
  out, state = jax.jit(tx.update)(grads, tx.init(grads), **extra)
  assert bool(jnp.all(jnp.isfinite(out["w"])))
  assert float(state.grad_norm) == 5.0


@pytest.mark.parametrize("fn", METRICS)
def test_metric_edge_values_are_accepted(fn):
  for window, n_sigma in [(2, 1e-9), (np.int64(10**9), np.float32(1e9)),
                          (np.array(3), np.array(2.0)),
                          (jnp.asarray(4), jnp.asarray(3.0))]:
    getattr(optax_zclip, fn)(LOSSES, window=window, n_sigma=n_sigma)


def test_concrete_jax_arrays_are_checked_and_tracers_are_not():
  params = {"w": jnp.ones(2)}
  # Outside jit, inject_hyperparams builds the transform from concrete jax
  # arrays: they are read and checked.
  bad = optax.inject_hyperparams(optax_zclip.zclip)(alpha=1.5)
  with pytest.raises(ValueError,
                     match=r"^`alpha` must be .*; got Array\(1\.5"):
    bad.init(params)
  good = optax.inject_hyperparams(optax_zclip.zclip)(alpha=0.5)
  out, _ = good.update(params, good.init(params))  # eager: read and used
  # Warm-up: clipped to max_grad_norm=1 from the norm sqrt(2).
  np.testing.assert_allclose(out["w"], 1 / (math.sqrt(2) + 1e-6), rtol=1e-6)
  # Inside jit the factory gets tracers: their value cannot be read without
  # a host sync, so an out-of-range injected value is the caller's
  # responsibility; no transfer happens. Their rank is checked.
  state = jax.jit(bad.init)(params)
  assert float(state.hyperparams["alpha"]) == 1.5
  state, params = jax.device_put((state, params))
  step = jax.jit(bad.update)
  with jax.transfer_guard("disallow"):
    step(params, state)
  with pytest.raises(ValueError, match="^`alpha` must be "):
    jax.jit(optax.inject_hyperparams(optax_zclip.zclip)(
        alpha=jnp.full(3, 0.5)).init)(params)


# Each dtype and the name the message gives it (NumPy's dtype name, the same
# under NumPy 1 and 2, whose scalar type is `bool_` in one, `bool` in the
# other).
@pytest.mark.parametrize("dtype,dtype_name", [
    (jnp.int32, "int32"), (jnp.int8, "int8"), (jnp.uint8, "uint8"),
    (jnp.bool_, "bool"), (jax.dtypes.float0, "float0")],
    ids=["int32", "int8", "uint8", "bool", "float0"])
@pytest.mark.parametrize("name", list(transforms.TRANSFORMS))
def test_a_leaf_that_is_not_floating_point_is_refused_when_traced(
    name, dtype, dtype_name):
  tx = transforms.with_adamw(name)
  # A wrapper's loss: an update without one warns first.
  extra = {"value": 2.5} if name in transforms.WRAPPERS else {}
  grads = {"w": jnp.ones(3), "layer": {"steps": np.zeros((2,), dtype)}}
  state = tx.init({"w": jnp.ones(3), "layer": {"steps": jnp.zeros(2)}})
  pattern = (r"^the updates must be floating-point \(or complex\) arrays; "
             rf"the leaf at \['layer'\]\['steps'\] has dtype {dtype_name}\.")
  with pytest.raises(ValueError, match=pattern):
    jax.jit(tx.update)(grads, state, **extra)
  with pytest.raises(ValueError, match=pattern):
    tx.update(grads, state, **extra)
  # A lone leaf at the root is named too.
  with pytest.raises(ValueError, match=r"the leaf at \(the root\) has dtype"):
    tx.update(jnp.zeros(3, jnp.int32), tx.init(jnp.zeros(3)), **extra)


@pytest.mark.parametrize("fn", ["zclip", "adagc"])
def test_max_grad_norm_inf_is_no_cap_like_none(fn):
  # Same outputs and states, bit for bit, through warm-up and spikes; and
  # inf can be injected, where None cannot.
  seq = make_sequence(steps=40, seed=5)
  kw = dict(warmup_steps=5)
  factory = getattr(optax_zclip, fn)
  none, inf = (factory(max_grad_norm=m, **kw) for m in (None, INF))
  injected = optax.inject_hyperparams(factory)(max_grad_norm=INF, **kw)
  s_none, s_inf, s_inj = (t.init(seq[0]) for t in (none, inf, injected))
  steps = [jax.jit(t.update) for t in (none, inf, injected)]
  capped = 0
  for grads in seq:
    o_none, s_none = steps[0](grads, s_none)
    o_inf, s_inf = steps[1](grads, s_inf)
    o_inj, s_inj = steps[2](grads, s_inj)
    for o in (o_inf, o_inj):
      for k in grads:
        np.testing.assert_array_equal(o[k], o_none[k])
    for a, b, c in zip(jax.tree.leaves(s_none), jax.tree.leaves(s_inf),
                       jax.tree.leaves(s_inj.inner_state), strict=True):
      np.testing.assert_array_equal(a, b)
      np.testing.assert_array_equal(a, c)
    capped += tree_norm64(grads.values()) > 1.0
  # A cap of 1 (the default) would have acted on these steps.
  assert capped >= 10


def errors_markdown() -> str:
  """The docs page's "Errors" section: the table, with real messages."""
  lines = [
      "## Errors",
      "",
      "Every public function checks its arguments when it is called (for",
      "the transforms: when the transform is built, before any step), and",
      "a bad value raises `ValueError` whose message names the argument in",
      "backticks, says what is allowed and shows what was given. Strings",
      "and bools where numbers belong, `None` where it is not allowed,",
      "floats where integers belong, and arrays of rank > 0 are rejected",
      "like out-of-range and non-finite numbers. A number may be a Python",
      "or NumPy scalar, a 0-d NumPy array, or a 0-d jax array that is not",
      "a tracer (its value is read when the transform is built).",
      "",
      "The transforms compute in float32, so their float arguments are",
      "checked as float32 values: `alpha=0.9999999999` is 1.0 in float32",
      "(the statistics would never move) and is rejected, like any value",
      "that float32 turns into 0 or inf. `max_grad_norm=inf` means no cap,",
      "like `None`, and unlike `None` it can be injected. `warmup_steps` is",
      "compared with an int32 step counter, which saturates at 2**31 - 1.",
  ]
  # One table per function (TABLE lists each function's arguments
  # together), so that the example messages have room on the page.
  previous = None
  for fns, arg, allowed, values in TABLE:
    fn = fns if isinstance(fns, str) else fns[0]
    try:
      call_with(fn, arg, values[0])
    except ValueError as e:
      message = str(e).replace("|", "\\|")
    else:
      raise AssertionError(f"{fn}({arg}={values[0]!r}) did not raise")
    if fns != previous:
      names = ([fns] if isinstance(fns, str) else list(fns))
      lines += ["", "**" + ", ".join(f"`{n}`" for n in names) + "**", "",
                "| argument | allowed | example message |",
                "|---|---|---|"]
      previous = fns
    lines.append(f"| `{arg}` | {allowed} | `` {message} `` |")
  lines += [
      "",
      "Values that are traced are not checked at build time: inside",
      "`jax.jit` (a jitted update under `optax.inject_hyperparams`, or a",
      "jitted `init`) the transform is built from tracers, whose value",
      "cannot be read without syncing with the host, so an injected",
      "`alpha=1.5` or a schedule that leaves the allowed range is not",
      "caught there; only the rank (a scalar) and the kind of number are",
      "checked. Outside `jax.jit`, `inject_hyperparams` builds the",
      "transform from concrete jax arrays, which are checked like numbers.",
      "`autoclip`'s and `skip_spikes`' `window` sets the state's shape, so",
      "it must be a Python int; with `inject_hyperparams` list it in",
      "`static_args`.",
      "`axis_name` is passed to `jax.lax.psum` as it is, and JAX reports an",
      "unknown axis name when the update is traced.",
      "",
      "The updates are checked when `update` is traced (dtypes are static,",
      "so this costs nothing at run time): an integer or bool leaf, which",
      "has no gradient and which scaling would truncate, raises",
      "`ValueError` naming its path. Complex leaves are clipped by their",
      "modulus.",
      "",
      "Mistakes that would pass every range check raise `TypeError`. The",
      "factories take keyword arguments only (but `skip_spikes`' `inner`",
      "and `clip_by_global_norm`'s `max_norm`, which have one meaning),",
      "so a learning rate or a swapped number cannot land on `alpha`.",
      "`skip_spikes` reads the loss from `value=` only: a loss by",
      "position, or by another name without `value`, would leave its loss",
      "test off, and is refused when the update is traced; an update with",
      "no `value` at all tests the norm alone and warns, once per trace,",
      "unless `value=None` or `loss_test=False` says that is meant. Each",
      "transform's `update` refuses, when it is traced, a state that is",
      "not the one its `init` builds (another transform's, a chain's, a",
      "checkpoint's dicts), rather than failing inside with an",
      "`AttributeError`; a state of an older release's layout goes",
      "through `migrate_state`, and the inner optimizer's state, when",
      "`skip_spikes` is added to a resumed run, through `init_around`.",
      "`stats` of a model, a parameter tree or None, which hold no",
      "optimizer state, would return `{}` and surface later as a missing",
      "key in the logger:",
      "",
      "| call | raises | message |",
      "|---|---|---|",
  ]
  for call, fn, _ in MISTAKES:
    kind, message = _outcome(fn)
    if kind is None:
      raise AssertionError(f"{call} neither raised nor warned")
    message = message.replace("|", "\\|")
    lines.append(f"| `{call}` | `{kind}` | `` {message} `` |")
  lines.append("")
  return "\n".join(lines)


def _outcome(fn) -> tuple[str | None, str]:
  """What ``fn()`` raises (a `TypeError` or `ValueError`) or else warns:
  ``(its class's name, its message)``; ``(None, "")`` if neither."""
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    try:
      fn()
    except (TypeError, ValueError) as e:
      return type(e).__name__, str(e)
  if caught:
    return caught[0].category.__name__, str(caught[0].message)
  return None, ""


def _skip_update(state=None, inner=None, **kwargs):
  """An update of `skip_spikes(inner)` (sgd) with ``kwargs`` (positional
  ``args``), from ``state`` (its own initial state if None)."""
  tx = optax_zclip.skip_spikes(optax.sgd(1.0) if inner is None else inner)
  g = jnp.ones(2)
  state = tx.init(g) if state is None else state
  return tx.update(g, state, g, *kwargs.pop("args", ()), **kwargs)


def _old_zclip_state():
  """A ZClipState as Orbax restores it without a target (a dict) from a
  checkpoint of 0.1.0, whose state had neither ``capped`` nor
  ``cap_count`` (its last field if neither is there)."""
  restored = optax_zclip.zclip().init(None)._asdict()
  added = [f for f in ("capped", "cap_count") if f in restored]
  for field in added or [list(restored)[-1]]:
    del restored[field]
  return restored


_G = jnp.ones(2)

# The mistakes of the Errors section's last table: (the call as shown, the
# call, the words of the fix its message must hold).
MISTAKES = (
    ("zclip(3e-4)", lambda: optax_zclip.zclip(3e-4),
     "Write zclip(alpha=0.0003)"),
    ("tx.update(grads, state, params, loss=loss)",
     lambda: _skip_update(loss=2.5), "Pass value=loss"),
    ("tx.update(grads, state, params, loss)",
     lambda: _skip_update(args=(2.5,)),
     "tx.update(grads, state, params, value=loss)"),
    ("tx.update(grads, state, params)  # tx = skip_spikes(...)",
     _skip_update, "Pass the step's loss"),
    ("zclip().update(grads, optax.adam(lr).init(params))",
     lambda: optax_zclip.zclip().update(_G, optax.adam(1e-3).init(_G)),
     "Pass this transform's own state"),
    ("skip_spikes(inner).update(grads, inner.init(params), value=loss)",
     lambda: _skip_update(optax.adam(1e-3).init(_G), optax.adam(1e-3),
                          value=2.5),
     "optax_zclip.init_around(tx, inner_state)"),
    ("zclip().update(grads, restored)  # an older release's ZClipState",
     lambda: optax_zclip.zclip().update(_G, _old_zclip_state()),
     "optax_zclip.migrate_state(restored, tx.init(params))"),
    ("skip_spikes(inner, window=64).update(grads, state, value=loss)",
     lambda: _skip_update(optax_zclip.skip_spikes(
         optax.sgd(1.0), window=64).init(_G), value=2.5),
     "init_around(tx, inner_state)"),
    ("stats(params)", lambda: optax_zclip.stats({"w": jnp.ones(2)}),
     "Pass the optimizer state"),
    ("stats(None)", lambda: optax_zclip.stats(None),
     "Pass the optimizer state"),
)


def test_each_mistake_raises_or_warns_with_a_message_that_names_the_fix():
  for call, fn, fix in MISTAKES:
    kind, message = _outcome(fn)
    assert kind in ("TypeError", "ValueError", "SkipSpikesNoLossWarning"), (
        call, kind)
    assert fix in message, (call, message)


DOCS_PAGE = (pathlib.Path(__file__).resolve().parent.parent / "docs" / "guides"
             / "errors.md")


def _docs_errors_span(text: str) -> tuple[int, int]:
  """Where the "## Errors" section starts and ends (next section or EOF)."""
  start = text.index("\n## Errors\n") + 1
  end = text.find("\n## ", start)
  return start, len(text) if end < 0 else end + 1


def _section(text: str, end: int) -> str:
  """The section as generated: a blank line before a section that follows."""
  return errors_markdown() + ("\n" if end < len(text) else "")


def test_errors_markdown_renders_a_row_per_argument():
  text = errors_markdown()
  rows = [line for line in text.splitlines() if line.startswith("| `")]
  assert len(rows) == len(TABLE) + len(MISTAKES)
  assert text.startswith("## Errors\n")


def test_docs_errors_section_is_up_to_date():
  text = DOCS_PAGE.read_text()
  start, end = _docs_errors_span(text)
  assert text[start:end] == _section(text, end), (
      "docs/guides/errors.md's Errors section is out of date: run "
      "`python tests/test_errors.py` to rewrite it from TABLE.")


if __name__ == "__main__":
  # Rewrites the docs page's Errors section from TABLE and the real messages.
  text = DOCS_PAGE.read_text()
  start, end = _docs_errors_span(text)
  DOCS_PAGE.write_text(text[:start] + _section(text, end) + text[end:])
