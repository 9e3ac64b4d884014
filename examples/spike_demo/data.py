"""The demo's data: a byte-level corpus that ships with the project.

`load_corpus` reads ``data/pydoc_topics.txt.gz`` (the Python documentation's
topic help, see ``data/build_corpus.py``) or any text file, as bytes, and
splits it into a training part and a held-out tail. Batches are windows of
``seq_len + 1`` bytes at random offsets; the offsets of step ``t`` depend only
on ``(seed, t)``, so every method sees the same batches and a resumed run
sees the batches it would have seen. `outlier_batch` makes the bad batches
the demo injects; they depend only on the step and their kind, so that every
method and seed sees the same ones.
"""

from __future__ import annotations

import dataclasses
import gzip
import pathlib

import numpy as np

DEFAULT_CORPUS = pathlib.Path(__file__).parent / "data" / "pydoc_topics.txt.gz"


@dataclasses.dataclass(frozen=True)
class Corpus:
  """Token ids (bytes) of a text, split into train and held-out parts."""

  train: np.ndarray
  heldout: np.ndarray
  source: str

  def batch(self, seed: int, step: int, batch_size: int,
            seq_len: int) -> np.ndarray:
    """The training batch of ``step``: ``[batch_size, seq_len + 1]`` int32."""
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, self.train.size - seq_len - 1, size=batch_size)
    return _windows(self.train, starts, seq_len)

  def eval_batches(self, batch_size: int, seq_len: int,
                   max_batches: int = 8) -> list[np.ndarray]:
    """Non-overlapping held-out windows, the same for every run."""
    n = min(max_batches * batch_size, (self.heldout.size - 1) // seq_len)
    starts = np.arange(n) * seq_len
    return [_windows(self.heldout, starts[i: i + batch_size], seq_len)
            for i in range(0, n - batch_size + 1, batch_size)] or [
                _windows(self.heldout, starts, seq_len)]


def outlier_batch(kind: str, step: int, batch_size: int, seq_len: int,
                  corpus: Corpus) -> np.ndarray:
  """The bad batch injected at ``step``: ``[batch_size, seq_len + 1]`` int32.

  ``repeat``: the whole batch is one byte repeated, as a shard of padding
  or a stuck writer would leave it; the byte is drawn from the training
  text (so it is one the model knows, mostly a letter or a space). One byte
  per batch rather than per sequence: different bytes' gradients partly
  cancel (measured at the default size: 6x the median norm with a byte per
  sequence, 12-30x with one per batch). ``random``: uniform random bytes,
  as a corrupted or binary file would give (about 9x). Drawn from
  ``(kind, step)`` only, never from the seed.
  """
  rng = np.random.default_rng([0xBAD, _KIND_IDS[kind], step])
  if kind == "repeat":
    value = corpus.train[rng.integers(0, corpus.train.size)]
    return np.full((batch_size, seq_len + 1), value, np.int32)
  if kind == "random":
    return rng.integers(0, 256, size=(batch_size, seq_len + 1),
                        dtype=np.int32)
  raise ValueError(f"unknown outlier batch kind {kind!r}")


_KIND_IDS = {"repeat": 1, "random": 2}


def _windows(data: np.ndarray, starts: np.ndarray, seq_len: int) -> np.ndarray:
  idx = starts[:, None] + np.arange(seq_len + 1)[None, :]
  return data[idx].astype(np.int32)


def load_corpus(path: str | pathlib.Path | None = None,
                heldout_fraction: float = 0.1) -> Corpus:
  """Reads a (optionally gzipped) text file as bytes; the tail is held out."""
  path = pathlib.Path(path) if path else DEFAULT_CORPUS
  raw = path.read_bytes()
  if path.suffix == ".gz":
    raw = gzip.decompress(raw)
  data = np.frombuffer(raw, np.uint8)
  if not 0 < heldout_fraction < 1:
    raise ValueError(f"`heldout_fraction` must be in (0, 1); got "
                     f"{heldout_fraction}")
  split = int(data.size * (1 - heldout_fraction))
  return Corpus(train=data[:split], heldout=data[split:], source=path.name)
