"""optax-zclip: adaptive gradient clipping for JAX/Optax.

``optax.chain(optax_zclip.zclip(), optax.adamw(lr))`` clips loss-spike
gradients with ZClip (Kumar et al., arXiv 2504.02507), making the same
decisions as the authors' PyTorch code.
"""

from optax_zclip._stats import stats
from optax_zclip._zclip import ZClipState, zclip

__version__ = "0.1.0"

__all__ = ["ZClipState", "stats", "zclip"]
