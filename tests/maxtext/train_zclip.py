"""train_zclip.py: MaxText's pre-training with ZClip in its optimizer.

    python train_zclip.py CONFIG.yml KEY=VALUE ...

takes what ``python -m maxtext.trainers.pre_train.train`` takes.
"""

import maxtext_zclip
from absl import app
from maxtext.trainers.pre_train import train

if __name__ == "__main__":
  maxtext_zclip.patch()
  app.run(train.main)
