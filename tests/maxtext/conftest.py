"""tests/maxtext: MaxText's own trainer with this package in its optimizer.

Collected only with ``OPTAX_ZCLIP_MAXTEXT=1`` (tests/conftest.py), in the
venv `bash .ci/maxtext install` builds (Python >= 3.12, MaxText pinned).
"""

# The guide's patch and the launcher run in MaxText's processes, not in
# pytest's: no doctests to collect from them (importing MaxText here would
# only slow the collection down).
collect_ignore = ["maxtext_zclip.py", "run_maxtext.py", "train_zclip.py"]
