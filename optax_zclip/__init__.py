"""optax-zclip: adaptive gradient clipping for JAX/Optax.

``optax.chain(optax_zclip.zclip(), optax.adamw(lr))`` clips loss-spike
gradients with ZClip (Kumar et al., arXiv 2504.02507), making the same
decisions as the authors' PyTorch code. `adagc` (per-tensor, Wang et al.,
arXiv 2502.11034) and `autoclip` (percentile, Seetharaman et al., arXiv
2007.14469) are the alternatives, `clip_by_global_norm` the fixed threshold
with the same telemetry; `stats` reads what any of them did from an optimizer
state, and `spike_score` / `count_spikes` measure the loss spikes they are
meant to prevent. `skip_spikes` wraps a whole optimizer and skips the steps
whose loss or gradient norm is an extreme outlier (OLMo-core's rule).
`replay` runs them over the norms of a run already logged (also a command,
``optax-zclip replay LOG``), to see what each would have clipped.
`migrate_state` brings a state restored from an older release's checkpoint
to today's layout.
"""

from optax_zclip._adagc import AdaGCState, adagc
from optax_zclip._autoclip import AutoClipState, autoclip
from optax_zclip._clip import ClipByGlobalNormState, clip_by_global_norm
from optax_zclip._metrics import count_spikes, spike_mask, spike_score
from optax_zclip._migrate import migrate_state
from optax_zclip._registry import loggable_state
from optax_zclip._replay import replay
from optax_zclip._skip import (
    SkipSpikesFallbackWarning,
    SkipSpikesNoLossWarning,
    SkipSpikesState,
    init_around,
    skip_spikes,
)
from optax_zclip._stats import stats
from optax_zclip._zclip import ZClipState, zclip

__version__ = "0.2.0"

__all__ = [
    "AdaGCState",
    "AutoClipState",
    "ClipByGlobalNormState",
    "SkipSpikesFallbackWarning",
    "SkipSpikesNoLossWarning",
    "SkipSpikesState",
    "ZClipState",
    "adagc",
    "autoclip",
    "clip_by_global_norm",
    "count_spikes",
    "init_around",
    "loggable_state",
    "migrate_state",
    "replay",
    "skip_spikes",
    "spike_mask",
    "spike_score",
    "stats",
    "zclip",
]
