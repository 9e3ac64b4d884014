"""Sphinx configuration of the optax-zclip documentation.

Build it with ``pip install -e ".[docs]"`` and
``python -m sphinx -W --keep-going -b html docs docs/_build/html``. The build
is offline: nothing is downloaded (no intersphinx inventories; MathJax is
served from the build itself), and every guide's code is executed.
"""

import os
import sys

sys.path.insert(0, os.path.abspath("_ext"))

import optax_zclip  # noqa: E402

project = "optax-zclip"
author = "The optax-zclip authors"
copyright = "2026, The optax-zclip authors"  # noqa: A001
release = optax_zclip.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "sphinx-mathjax-offline",
    "sphinx_copybutton",
    "sphinx_design",
    "myst_nb",
    "api_coverage",
]

source_suffix = {".rst": "restructuredtext", ".md": "myst-nb"}
exclude_patterns = ["_build", "**.ipynb_checkpoints", "README.md"]
root_doc = "index"

# Python cross-references: `name` in a docstring is a reference to a Python
# object. This package's names link to their API entries; names of other
# libraries (optax.*, jax.*) render as code, since resolving them would need
# an inventory downloaded at build time.
default_role = "py:obj"
add_module_names = True
python_display_short_literal_types = True

autodoc_typehints = "signature"
autodoc_member_order = "bysource"
autosummary_generate = False

napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_use_ivar = False
# The dtype and shape of each field are in its description; the annotation
# (jax.Array for all of them) would only repeat itself.
napoleon_attr_annotations = False

# MyST and executed pages.
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3
nb_execution_mode = os.environ.get("OPTAX_ZCLIP_DOCS_EXECUTE", "force")
nb_execution_timeout = 300
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_merge_streams = True
nb_output_stderr = "remove-warn"

# HTML.
html_theme = "sphinx_book_theme"
html_title = f"optax-zclip {release}"
html_static_path = ["_static"]
html_css_files = ["custom.css"]
html_theme_options = {
    "show_toc_level": 2,
    "use_download_button": False,
    "use_fullscreen_button": False,
    "navigation_with_keys": False,
    "home_page_in_toc": True,
}
html_show_sourcelink = False
copybutton_prompt_text = r">>> |\.\.\. |\$ "
copybutton_prompt_is_regexp = True

# Show the annotations as written, not JAX's ArrayLike expanded into its union.
autodoc_type_aliases = {
    "jax.typing.ArrayLike": "jax.typing.ArrayLike",
    "ArrayLike": "jax.typing.ArrayLike",
    "AxisName": "AxisName",
}
toc_object_entries_show_parents = "hide"
