"""Resumes training runs from Orbax checkpoints, in a fresh process.

`test_checkpoint.py` trains ``chain(<transform>, adamw)`` (wrapped, for a
wrapper) for every entry of the registry (transforms.py), saving params and
the whole optimizer state with `orbax.checkpoint.StandardCheckpointer` at
each ``save_at`` of the entry's cases in `CASES` under ``<ckpt_root>/<case>``
(in the warm-up, for an entry that has one, and after it), and runs this
script::

  python checkpoint_worker.py CKPT_ROOT OUT_DIR CASE [CASE ...]

For each case it restores the checkpoint into an abstract target made with
`jax.eval_shape` (so the structure and dtypes come from ``tx.init``, not
from the files), continues to ``steps``, and writes to ``OUT_DIR``
``<case>.npz``: the bits of every leaf right after the restore
(``restored_<i>``) and at the end (``final_<i>``), and ``<case>.json``: the
leaves' paths, dtypes and shapes, and the restored tree's structure.

The definitions here (transforms, parameters, the gradient of each step) are
imported by the test too, so that both processes run the same training.
"""

from __future__ import annotations

import functools
import json
import pathlib
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from references import SEQ, SHAPES
from transforms import TRANSFORMS, no_loss, with_adamw

# One leaf in bf16, to check that checkpoints keep low-precision dtypes.
DTYPES = {"w1": jnp.float32, "b1": jnp.bfloat16, "w2": jnp.float32}


class Case(NamedTuple):
  name: str  # the registry entry
  save_at: int
  steps: int


STEPS = 90
AFTER = 40  # after every warm-up, with spikes (31, 32; 50, 66, 81) both sides


def _cases() -> dict[str, Case]:
  """Each entry saved after its warm-up, and in its middle if it has one.

  (AutoClip's ring buffer, 8 long, wraps before and after the save.)
  """
  cases = {}
  for name, e in TRANSFORMS.items():
    assert e.warmup < AFTER
    if e.warmup:
      cases[f"{name}_warmup"] = Case(name, e.warmup // 2 + 1, STEPS)
    cases[f"{name}_after"] = Case(name, AFTER, STEPS)
  return cases


CASES = _cases()


@functools.cache
def make_tx(name: str) -> optax.GradientTransformation:
  """The entry's transform before AdamW (wrapped, for a wrapper)."""
  return with_adamw(name, weight_decay=1e-4)


def make_params() -> dict[str, jax.Array]:
  return {k: jnp.linspace(-1.0, 1.0, int(np.prod(s))).reshape(s)
             .astype(DTYPES[k]) for k, s in SHAPES.items()}


def grads_at(t: int) -> dict[str, jax.Array]:
  return {k: jnp.asarray(v).astype(DTYPES[k]) for k, v in SEQ[t].items()}


@functools.cache
def make_step(name: str) -> Callable:
  """The jitted training step of ``make_tx(name)``: one per entry, shared
  by its cases."""
  tx = make_tx(name)

  @jax.jit
  def step(params, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params, **no_loss(name))
    return optax.apply_updates(params, updates), opt_state

  return step


def bits(x: Any) -> np.ndarray:
  """The raw bits of an array, as unsigned integers of the same width."""
  a = np.asarray(x)
  return a.view(f"u{a.dtype.itemsize}")


def describe(tree: Any) -> dict[str, Any]:
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
  return dict(
      treedef=str(treedef),
      paths=[jax.tree_util.keystr(p) for p, _ in flat],
      dtypes=[str(x.dtype) for _, x in flat],
      shapes=[list(x.shape) for _, x in flat])


def abstract_target(case: str) -> dict[str, Any]:
  tx = make_tx(CASES[case].name)
  params = jax.eval_shape(make_params)
  return {"params": params, "opt_state": jax.eval_shape(tx.init, params)}


def resume(ckpt_root: pathlib.Path, out_dir: pathlib.Path, case: str) -> None:
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  target = abstract_target(case)
  with ocp.StandardCheckpointer() as ckptr:
    restored = ckptr.restore((ckpt_root / case).absolute(), target)
  info = describe(restored)
  arrays = {f"restored_{i}": bits(x)
            for i, x in enumerate(jax.tree.leaves(restored))}
  step = make_step(CASES[case].name)
  params, opt_state = restored["params"], restored["opt_state"]
  for t in range(CASES[case].save_at, CASES[case].steps):
    params, opt_state = step(params, opt_state, grads_at(t))
  final = {"params": params, "opt_state": opt_state}
  arrays.update({f"final_{i}": bits(x)
                 for i, x in enumerate(jax.tree.leaves(final))})
  np.savez(out_dir / f"{case}.npz", **arrays)
  (out_dir / f"{case}.json").write_text(json.dumps(info))


def main(argv: list[str]) -> None:
  ckpt_root, out_dir = pathlib.Path(argv[0]), pathlib.Path(argv[1])
  for case in argv[2:]:
    resume(ckpt_root, out_dir, case)


if __name__ == "__main__":
  main(sys.argv[1:])
