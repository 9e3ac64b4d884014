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

import jax.numpy as jnp
import optax
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] /
                       "benchmarks"))

import memory  # noqa: E402
from versions import between, measured_on  # noqa: E402

import optax_zclip  # noqa: E402

# Every figure held from jaxlib 0.10.2 to 0.12.0.1 but two, which moved at
# 0.11.1 (XLA_0_11_1 below: the bf16 copy, the fallback's peak).
pytestmark = measured_on("0.10.2", "0.12.0.1", "XLA's buffer sizes and cost "
                         "model (bytes accessed)")
XLA_0_11_1 = between("0.11.1", "0.12.0.1")

MATRICES, SIZE = 4, 512
PARAM_BYTES = MATRICES * SIZE * SIZE * 4


@functools.cache
def _bare(dtype="float32"):
  """Bare AdamW's step, compiled once (and not where the tests skip)."""
  return memory.analyse(optax.adamw(1e-3), False, MATRICES, SIZE, dtype)


def _extra(tx, with_value=False, dtype="float32"):
  temp, nbytes = memory.analyse(tx, with_value, MATRICES, SIZE, dtype)
  bare_temp, bare_bytes = _bare(dtype)
  param_bytes = PARAM_BYTES // 4 * jnp.dtype(dtype).itemsize
  return (temp - bare_temp) / param_bytes, (nbytes - bare_bytes) / param_bytes

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


def test_skip_spikes_without_a_clip_adds_no_buffer():
  # skip_spikes around bare AdamW measures the norm of the very gradients
  # AdamW squares: XLA's common subexpression elimination merged the norm's
  # x * x with AdamW's g ** 2, and the shared square, read by two fusions,
  # was written to memory (+1x peak, +4.06x traffic before the norm's
  # optimization barrier).
  temp, nbytes = _extra(optax_zclip.skip_spikes(optax.adamw(1e-3)), True)
  assert temp <= 0.01, temp
  # The norm's read, its rescaled pass and the window buffers, as with a
  # clip inside (test_budgets).
  assert nbytes == pytest.approx(2.06, abs=0.02), nbytes


@pytest.mark.parametrize("name", list(CLIPPERS))
def test_bf16_gradients_get_no_float32_copy(name):
  # The norm squares a bf16 leaf in float32. Merged with the float32 cast
  # of the same leaf that the clip's scale makes, the cast had two
  # consumers and XLA wrote it to memory: a float32 copy of every gradient
  # (+0.75x the bf16 parameters' bytes here, +2x traffic).
  temp, nbytes = _extra(optax.chain(CLIPPERS[name](), optax.adamw(1e-3)),
                        dtype="bfloat16")
  skip_temp, _ = _extra(optax_zclip.skip_spikes(
      optax.chain(CLIPPERS[name](), optax.adamw(1e-3))), True, "bfloat16")
  # skip_spikes adds no buffer to the chain it wraps, on every release.
  assert skip_temp <= temp + 0.001, (skip_temp, temp)
  if XLA_0_11_1:
    # A known difference, not fixed (issue 41): from jaxlib 0.11.1 on,
    # XLA:CPU writes out each bf16 gradient in the layout in which the
    # overflow pass's conditional takes it (before, a free bitcast of the
    # matmul's output): +0.75x the bf16 parameters' bytes of peak and +2x
    # traffic, in every clipper's chain (float32 steps are unchanged; with
    # the conditional taken out, an experiment, the copy goes). Pinned, so
    # that XLA's fix, or a worse copy, shows here.
    assert temp == pytest.approx(0.75, abs=0.01), temp
    assert nbytes == pytest.approx(10.02, abs=0.04), nbytes
    pytest.xfail("jaxlib >= 0.11.1 on CPU: a copy of the bf16 gradients for "
                 "the overflow pass's conditional (+0.75x peak, +2x traffic)")
  assert temp <= 0.01, temp
  assert nbytes == pytest.approx(8.02, abs=0.02), nbytes


def test_selecting_after_pays_for_a_copy_of_the_moments():
  # Selecting after the update (zero_copy=False, and skip_spikes' fallback
  # where its zero-copy select cannot run) selects the whole new state:
  # XLA keeps the old AdamW moments beside the new ones (+2x, less the
  # buffers it can reuse at this size) and reads and writes them again.
  # What the zero-copy select saves, measured.
  fast_temp, fast_bytes = _extra(optax_zclip.skip_spikes(
      optax.chain(optax_zclip.zclip(), optax.adamw(1e-3))), True)
  temp, nbytes = _extra(memory.selecting_after(), True)
  # jaxlib 0.11.1's buffer assignment reuses more at this size: 1.49x, not
  # 1.74x (the traffic, +5x, is the same on both).
  assert temp == pytest.approx(1.49 if XLA_0_11_1 else 1.74, abs=0.01), temp
  assert nbytes - fast_bytes == pytest.approx(5.0, abs=0.02), nbytes
  assert fast_temp <= 0.01
