"""The documentation: every public name is in the API reference with numpydoc
sections whose Examples run (doctest), the guide's code runs and checks itself
against NumPy, the README is a front page, nothing points outside the
repository, and the built site renders in a real browser (headless Chromium)
with batch_norm_train's signature and parameter table.

The Sphinx build and the browser check need sphinx/numpydoc and Chromium;
without them those tests skip. CI (.ci/docs) builds the site with warnings as
errors and passes its folder in BNCORE_DOCS_HTML."""
import doctest
import inspect
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser

import numpy as np
import pytest

import bncore

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
PUBLIC = [n for n in bncore.__all__ if n != "__version__"]
WRITTEN_BY_THE_DEMO = {"gallery.md"}  # docs/gallery.md, with the demo's figures
# takes no argument and only reads two settings: it has no Raises section to give
RAISES_NOTHING = {"get_num_threads"}


def _read(*parts):
    with open(os.path.join(ROOT, *parts), encoding="utf-8") as f:
        return f.read()


def _public_objects():
    """(qualified name, object) for every public name and its classes' public methods."""
    out = []
    for name in PUBLIC:
        obj = getattr(bncore, name)
        out.append((f"bncore.{name}", obj))
        if inspect.isclass(obj):
            for attr, member in vars(obj).items():
                if callable(member) and (not attr.startswith("_") or attr == "__call__"):
                    out.append((f"bncore.{name}.{attr}", member))
    return out


# ---- the API reference ------------------------------------------------------------------

def test_api_reference_lists_every_public_name():
    listed = set(re.findall(r"^   (\w+)$", _read("docs", "api.rst"), re.M))
    assert set(PUBLIC) <= listed, sorted(set(PUBLIC) - listed)
    missing = [n for n in listed - set(PUBLIC)
               if n not in ("SyncBatchNorm", "convert_sync_batchnorm", "torch_allgather")]
    assert not missing, f"api.rst lists names that are not public: {missing}"


@pytest.mark.parametrize("name", PUBLIC)
def test_numpydoc_sections(name):
    docscrape = pytest.importorskip("numpydoc.docscrape")
    obj = getattr(bncore, name)
    is_class = inspect.isclass(obj)
    doc = (docscrape.ClassDoc if is_class else docscrape.FunctionDoc)(obj)
    missing = []
    try:
        params = [p for p in inspect.signature(obj).parameters.values()
                  if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    except (TypeError, ValueError):  # a builtin without a signature
        params = []
    documented = {n.strip() for p in doc["Parameters"] for n in p.name.split(",")}
    undocumented = [p.name for p in params if p.name not in documented]
    if undocumented:
        missing.append(f"Parameters {undocumented}")
    if not is_class and not doc["Returns"] and not doc["Yields"]:
        missing.append("Returns")
    if not doc["Raises"] and name not in RAISES_NOTHING:
        missing.append("Raises")
    if not "".join(doc["Examples"]).strip():
        missing.append("Examples")
    assert not missing, f"bncore.{name}: numpydoc docstring lacks {', '.join(missing)}"


def _doctests():
    finder = doctest.DocTestFinder(recurse=False)
    cases = []
    for qualname, obj in _public_objects():
        for t in finder.find(obj, qualname, globs={"np": np, "bncore": bncore}):
            if t.examples:
                cases.append(pytest.param(t, id=qualname))
    return cases


_DOCTESTS = _doctests()


@pytest.mark.parametrize("test", _DOCTESTS or [pytest.param(None, id="none")])
def test_docstring_examples(test):
    """The Examples section of every public docstring runs and prints what it shows."""
    if test is None:
        pytest.skip("no public docstring has examples yet")
    for line in (e.source for e in test.examples):  # optional packages an example imports
        for module in re.findall(r"^(?:import|from) (\w+)", line):
            if module not in ("numpy", "bncore"):
                pytest.importorskip(module)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    with np.printoptions(legacy=False):
        result = runner.run(test, out=sys.stdout.write)
    assert result.failed == 0, f"{test.name}: {result.failed} of {result.attempted} examples failed"


# ---- the guide's code -------------------------------------------------------------------

@pytest.mark.parametrize("page", ["docs/getting_started.md", "docs/batch_norm.md",
                                  "docs/api_contract.md", "docs/index.md", "README.md"])
def test_guide_code_runs(page):
    """Each page's Python blocks run in order in one namespace (the contract page
    compares every formula with float64 NumPy; batch_norm.md checks layouts and
    thread counts)."""
    pytest.importorskip("threadpoolctl")
    blocks = re.findall(r"```python\n(.*?)```", _read(page), re.S)
    assert blocks, page
    ns = {}
    for block in blocks:
        exec(compile(block, os.path.join(ROOT, page), "exec"), ns)


def test_guide_covers_the_issue_topics():
    toc = _read("docs", "index.md")
    for page in ("getting_started", "batch_norm", "api_contract", "normalization", "inference",
                 "distributed", "C_API", "benchmarks", "design", "errors", "api", "RELIABILITY"):
        assert re.search(rf"^{page}$", toc, re.M), f"index.md's toctree lacks {page}"
        assert os.path.exists(os.path.join(DOCS, page + ".md")) or \
            os.path.exists(os.path.join(DOCS, page + ".rst")), page


# ---- the front page, versions, references ---------------------------------------------------

def test_readme_is_a_front_page():
    text = _read("README.md")
    lines = text.splitlines()
    assert len(lines) <= 220, f"README.md has {len(lines)} lines; the front page keeps to ~200"
    for tag in ("# the main job", "# the tests"):
        hits = [ln for ln in lines if ln.endswith(tag)]
        assert len(hits) == 1 and hits[0].startswith("python3 -m venv .venv && "), tag
    links = re.findall(r"\]\((?!https?://|#)([^)\s]+)\)", text)
    assert any(t.startswith("docs/") for t in links)
    demo_written = os.path.exists(os.path.join(DOCS, "gallery.md"))
    for target in links:
        path = os.path.join(ROOT, target.split("#")[0])
        if not demo_written and target.startswith(("docs/images/", "docs/gallery.md")):
            continue  # the demo's gallery and figures, absent until they are committed
        assert os.path.exists(path), f"README.md links to {target}, which does not exist"
    for fig in ("demo.png", "demo_renorm.png", "demo_recurrent.png", "demo_layernorm.png"):
        assert f"](docs/images/{fig})" in text, f"README.md's gallery lacks {fig}"


def test_one_version():
    v = bncore.__version__
    assert re.search(rf"^version: {re.escape(v)}$", _read("CITATION.cff"), re.M)
    assert "version = attr: bncore._version.__version__" in _read("setup.cfg")
    assert re.search(rf"^## \[(Unreleased|{re.escape(v)})\]", _read("CHANGELOG.md"), re.M)
    assert "BSD 3-Clause" in _read("LICENSE") and "license = BSD-3-Clause" in _read("setup.cfg")


def _repo_text_files():
    try:
        files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                               cwd=ROOT, capture_output=True, text=True, check=True,
                               timeout=60).stdout.split()
    except (OSError, subprocess.SubprocessError):
        files = [os.path.relpath(os.path.join(d, f), ROOT)
                 for d, dirs, fs in os.walk(ROOT)
                 if not any(p.startswith(".") or p in ("build", "_build", "generated")
                            for p in os.path.relpath(d, ROOT).split(os.sep) if p != ".")
                 for f in fs]
    exts = (".py", ".pyx", ".pyi", ".h", ".c", ".md", ".rst", ".cfg", ".toml", ".txt", ".json",
            ".yaml", ".yml", ".cff", "")
    for rel in files:
        if rel.endswith(exts) and os.path.isfile(os.path.join(ROOT, rel)):
            try:
                yield rel, _read(rel)
            except UnicodeDecodeError:
                continue


def test_nothing_refers_outside_the_repository():
    """No file points at documents that are not in the repository (a shared/
    folder, an API.md or PERF.md kept elsewhere)."""
    present = {f for _, _, fs in os.walk(ROOT) for f in fs if f.endswith(".md")}
    bad = []
    for rel, text in _repo_text_files():
        if rel == "tests/test_docs.py":
            continue
        for m in re.finditer(r"\.\./shared\b|\bshared/|\b([\w.-]+\.md)\b", text):
            if m.group(1) is None or m.group(1) not in present | WRITTEN_BY_THE_DEMO:
                line = text.count("\n", 0, m.start()) + 1
                bad.append(f"{rel}:{line}: {m.group(0)}")
    assert not bad, "references to files outside the repository:\n" + "\n".join(bad)


# ---- the built site in a browser ------------------------------------------------------------

@pytest.fixture(scope="module")
def html_dir(tmp_path_factory):
    """The built site: BNCORE_DOCS_HTML (CI builds it first), else a fresh build
    with warnings as errors (skipped without sphinx)."""
    given = os.environ.get("BNCORE_DOCS_HTML")
    if given:
        assert os.path.isfile(os.path.join(given, "index.html")), given
        return given
    pytest.importorskip("sphinx")
    pytest.importorskip("numpydoc")
    pytest.importorskip("myst_parser")
    pytest.importorskip("pydata_sphinx_theme")
    out = str(tmp_path_factory.mktemp("html"))
    r = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
                        "-d", os.path.join(out, ".doctrees"), DOCS, out],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"sphinx-build -W failed:\n{r.stdout}\n{r.stderr}"
    return out


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no Chromium on PATH (CI installs Debian's chromium)")


def _dump_dom(url):
    r = subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu",
                        "--disable-dev-shm-usage", "--virtual-time-budget=5000", "--dump-dom",
                        url], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "<html" in r.stdout, r.stderr[-2000:]
    return r.stdout


class _Text(HTMLParser):
    """The visible text of a page, and the parameter names of numpydoc's
    parameter table: the <strong> names of the <dt> rows of the list that
    follows the 'Parameters' label."""

    def __init__(self):
        super().__init__()
        self.chunks, self.skip = [], 0
        self.field, self.depth, self.in_name, self.params = None, 0, False, []

    def handle_starttag(self, tag, attrs):
        if tag in ("script", "style"):
            self.skip += 1
        if self.field == "Parameters":
            if tag == "dl":
                self.depth += 1
            elif tag == "strong" and self.depth == 1:
                self.in_name = True

    def handle_endtag(self, tag):
        if tag in ("script", "style"):
            self.skip -= 1
        if self.field == "Parameters":
            if tag == "strong":
                self.in_name = False
            elif tag == "dl":
                self.depth -= 1
                if self.depth == 0:
                    self.field = "done"

    def handle_data(self, data):
        if self.skip:
            return
        self.chunks.append(data)
        if self.in_name:
            self.params += [n.strip() for n in data.split(",") if n.strip()]
        if self.field is None and data.strip() == "Parameters":
            self.field = "Parameters"

    @property
    def text(self):
        return re.sub(r"\s+", " ", "".join(self.chunks))


def _render(path):
    p = _Text()
    p.feed(_dump_dom("file://" + os.path.abspath(path)))
    return p


def test_browser_renders_index(html_dir):
    page = _render(os.path.join(html_dir, "index.html"))
    assert "bncore" in page.text
    for title in ("Getting started", "The API contract", "API reference"):
        assert title in page.text, f"index.html does not show {title!r}"


def test_browser_renders_batch_norm_train(html_dir):
    """The API page of batch_norm_train shows its signature and a parameter
    table with a row for every parameter."""
    page = _render(os.path.join(html_dir, "generated", "bncore.batch_norm_train.html"))
    sig = inspect.signature(bncore.batch_norm_train)
    shown = page.text.replace("\u200b", "")
    # x, weight=None, bias=None, *, axis=1, ...
    # the page shows no annotations (autodoc_typehints = "none": the parameter
    # table carries the types), so neither does the expected signature
    first = [p.replace(annotation=p.empty) for p in list(sig.parameters.values())[:3]]
    head = "batch_norm_train(" + ", ".join(map(str, first)) + ", *,"
    assert re.sub(r"\s", "", head) in re.sub(r"\s", "", shown), \
        f"signature not shown; expected it to start with {head!r}"
    names = page.params
    assert names, "no parameter table (numpydoc 'Parameters' section) on the page"
    missing = [p for p in sig.parameters if p not in names]
    assert not missing, f"parameter table lacks {missing}; rows: {names}"


# ---- types ----------------------------------------------------------------------------------

def test_kernels_stub_matches_the_module():
    """bncore/_kernels.pyi names exactly the compiled module's functions."""
    from bncore import _kernels

    stub = set(re.findall(r"^def (\w+)\(", _read("bncore", "_kernels.pyi"), re.M))
    actual = {n for n in dir(_kernels) if not n.startswith("__") and callable(getattr(_kernels, n))}
    assert stub == actual, (f"only in the stub: {sorted(stub - actual)}; "
                            f"only in the module: {sorted(actual - stub)}")
    assert os.path.exists(os.path.join(ROOT, "bncore", "py.typed"))
