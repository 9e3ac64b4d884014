"""Rebuilds ``pydoc_topics.txt.gz``, the demo's byte-level training text.

The text is the topic help of the Python documentation (``help("if")`` and
the like), as CPython ships it in ``pydoc_data/topics.py``: about 460 KB of
English prose with code, under the Python Software Foundation License
(https://docs.python.org/3/license.html). The committed file was built with
CPython 3.11; rebuilding with another version gives slightly different text,
which is why the demo reads the committed copy.

  python examples/spike_demo/data/build_corpus.py
"""

import gzip
import pathlib
from pydoc_data.topics import topics


def main() -> None:
  text = "\n\n".join(topics[k].strip() for k in sorted(topics)) + "\n"
  out = pathlib.Path(__file__).with_name("pydoc_topics.txt.gz")
  # mtime=0: the same text always gives the same bytes.
  with open(out, "wb") as f, gzip.GzipFile(fileobj=f, mode="wb", mtime=0,
                                           compresslevel=9) as gz:
    gz.write(text.encode("utf-8"))
  print(f"wrote {out} ({len(text):,} characters)")


if __name__ == "__main__":
  main()
