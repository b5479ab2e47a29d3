"""Sphinx configuration of the mcntk documentation.

Build: ``.ci/docs``, i.e. ``sphinx-build -W --keep-going -b html docs docs/_build/html``
after ``pip install -e ".[docs]"``. Sphinx with myst-nb because the tutorials must be
*executed* at every build (``nb_execution_mode = "force"``), read from the jupytext
percent-format ``.py`` files that are reviewed as text (``nb_custom_formats``), and the
API reference comes from the Google-style docstrings through autodoc and napoleon.
"""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))  # a source checkout works without installing

# The notebook kernels inherit this environment. Executing the tutorials is mostly XLA
# compiling many small programs once each; on CPU, LLVM optimisation level 0 makes that
# about twice as fast (more for convolutions), and the programs run long enough either way.
# Set XLA_FLAGS yourself to override (notebook 5 appends its device count to it).
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")

project = "mcntk"
author = "mcntk developers"
copyright = "mcntk developers"

extensions = [
    "myst_nb",  # Markdown pages and executed notebooks (brings myst_parser)
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",  # Google-style docstrings
]

# Pages: Markdown (myst) and notebooks. docs/notebooks links to ../notebooks; the paired
# .ipynb files are excluded so that each notebook is read once, from its .py text form.
exclude_patterns = [
    "_build",
    "jupyter_execute",
    "conf.py",
    "notebooks/*.ipynb",
    "notebooks/README.md",
    "notebooks/.ipynb_checkpoints",
]
myst_enable_extensions = ["colon_fence", "dollarmath"]
myst_heading_anchors = 3  # links such as long_runs.md#non-finite-samples

# Notebooks: executed at every build, each cell within a time limit; an error fails it.
nb_custom_formats = {".py": ["jupytext.reads", {"fmt": "py:percent"}]}
nb_execution_mode = "force"
nb_execution_timeout = 300  # seconds per cell
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_merge_streams = True

# API reference
autodoc_member_order = "bysource"
autodoc_typehints = "none"  # the docstrings state types; signatures stay readable
autosummary_generate = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False

html_theme = "furo"
html_title = "mcntk"
