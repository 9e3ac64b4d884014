"""Memory and traffic budgets of the donated train step, from XLA's analyses.

`compiled.memory_analysis()` and `compiled.cost_analysis()["bytes accessed"]`
are deterministic, so exact budgets can be asserted (in units of the
parameters' bytes, over bare AdamW), where a timing could not be. The step is
`benchmarks/memory.py`'s on a smaller tree; the Performance guide has its
table at full size.
"""

import functools
import pathlib
import sys

import optax
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] /
                       "benchmarks"))

import memory  # noqa: E402
from versions import measured_on  # noqa: E402

import optax_zclip  # noqa: E402

pytestmark = measured_on("0.10.2", "0.10.2", "XLA's buffer sizes and cost "
                         "model (bytes accessed)")

MATRICES, SIZE = 4, 512
PARAM_BYTES = MATRICES * SIZE * SIZE * 4


@functools.cache
def _bare():
  """Bare AdamW's step, compiled once (and not where the tests skip)."""
  return memory.analyse(optax.adamw(1e-3), False, MATRICES, SIZE)


def _extra(tx, with_value=False):
  temp, nbytes = memory.analyse(tx, with_value, MATRICES, SIZE)
  bare_temp, bare_bytes = _bare()
  return (temp - bare_temp) / PARAM_BYTES, (nbytes - bare_bytes) / PARAM_BYTES

CLIPPERS = {
    "zclip": optax_zclip.zclip,
    "adagc": optax_zclip.adagc,
    "autoclip": optax_zclip.autoclip,
    "clip_by_global_norm": lambda: optax_zclip.clip_by_global_norm(1.0),
}


def test_the_anchors():
  # The measure sees a copy and a pass: optax's clip materialises the
  # clipped gradients (+1x memory) and reads them again; a plain norm and a
  # scale folded into AdamW is exactly one read.
  temp, nbytes = _extra(optax.chain(optax.clip_by_global_norm(1.0),
                                    optax.adamw(1e-3)))
  assert temp == pytest.approx(1.0, abs=0.01)
  assert nbytes == pytest.approx(5.0, abs=0.01)
  temp, nbytes = _extra(optax.apply_if_finite(optax.adamw(1e-3), 3))
  assert temp == pytest.approx(1.0, abs=0.01)
  assert nbytes == pytest.approx(4.5, abs=0.01)
  temp, nbytes = _extra(optax.chain(memory.plain_norm_and_scale(),
                                    optax.adamw(1e-3)))
  assert temp == pytest.approx(0.0, abs=0.001)
  assert nbytes == pytest.approx(1.0, abs=0.005)


@pytest.mark.parametrize("name", list(CLIPPERS))
def test_budgets(name):
  make = CLIPPERS[name]
  temp, nbytes = _extra(optax.chain(make(), optax.adamw(1e-3)))
  # No gradient-sized buffer: only per-row partial sums of the rescaled
  # pass (a few KiB).
  assert 0 <= temp <= 0.01, temp
  # One read of the gradients for the norms, plus the rescaled pass: a
  # conditional branch that runs only when a float32 sum of squares
  # overflowed, but that XLA's cost model counts as if it ran.
  assert nbytes == pytest.approx(2.0, abs=0.02), nbytes
  skip_temp, skip_bytes = _extra(
      optax_zclip.skip_spikes(optax.chain(make(), optax.adamw(1e-3))), True)
  # skip_spikes: no copy of the optimizer state, no extra pass (the global
  # norm is shared; the selects fuse into AdamW's loops).
  assert skip_temp <= temp + 0.001, (skip_temp, temp)
  # (+0.05x here is its window buffers and scalars, 200 KB; +0.02x at the
  # full size of benchmarks/memory.py.)
  assert skip_bytes <= nbytes + 0.1, (skip_bytes, nbytes)


def test_the_fallback_pays_for_a_copy_of_the_moments():
  # skip_spikes' fallback (where its jaxpr replay cannot run) selects the
  # whole new state after the update: XLA keeps the old AdamW moments
  # beside the new ones (+2x, less the buffers it can reuse at this size)
  # and reads and writes them again. What the replay saves, measured.
  tx = optax_zclip.skip_spikes(optax.chain(optax_zclip.zclip(),
                                           optax.adamw(1e-3)))
  fast_temp, fast_bytes = _extra(tx, True)
  with memory.replay_unavailable():
    temp, nbytes = _extra(tx, True)
  assert temp == pytest.approx(1.74, abs=0.01), temp
  assert nbytes - fast_bytes == pytest.approx(5.0, abs=0.02), nbytes
  assert fast_temp <= 0.01
