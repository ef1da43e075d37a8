"""Sphinx configuration for bncore's documentation.

Build (from the repository root, with bncore importable: built in place or
installed)::

    python -m sphinx -W --keep-going -b html docs docs/_build/html

Pages are Markdown (MyST) or reST; the API reference is generated from the
numpydoc docstrings of every name in ``bncore.__all__`` (docs/api.rst).
"""
import os
import sys

# An in-place build of the checkout is documented when nothing is installed.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import bncore  # noqa: E402

project = "bncore"
author = "The bncore developers"
copyright = "2026, The bncore developers"
version = release = bncore.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
    "numpydoc",
    "myst_parser",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
templates_path = ["_templates"]

# MyST: $...$ maths, ::: fences, heading anchors for links between pages
myst_enable_extensions = ["dollarmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# API reference: one page per public name, generated at build time
autosummary_generate = True
autosummary_imported_members = True
autodoc_default_options = {"members": False}
autodoc_typehints = "none"  # numpydoc's Parameters section carries the types
numpydoc_show_class_members = False  # the class template lists the methods
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False
numpydoc_attributes_as_param_list = True

# Links into NumPy's docs are not resolved: the build runs offline.
intersphinx_mapping = {}

html_theme = "pydata_sphinx_theme"
html_title = f"bncore {release}"
html_static_path = []
html_theme_options = {
    "github_url": "https://github.com/bncore/bncore",
    "navigation_with_keys": False,
    "show_toc_level": 2,
}
html_show_sourcelink = False

# bncore.distributed imports mpi4py at import; the reference needs no MPI library
autodoc_mock_imports = ["mpi4py"]


def _drop_missing_gallery(app, docname, source):
    """The demo gallery (docs/gallery.md) is listed in index.md; until the demo
    has written it, leave it out of the toctree instead of failing the build."""
    if docname == "index" and not os.path.exists(os.path.join(app.srcdir, "gallery.md")):
        source[0] = source[0].replace("\ngallery\n", "\n")


def setup(app):
    app.connect("source-read", _drop_missing_gallery)
