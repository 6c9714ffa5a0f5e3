"""Every fenced ```python block of the docs and the README runs."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [p for p in sorted((ROOT / "docs").rglob("*.md")) if p.name != "training_loop.md"] + [ROOT / "README.md"]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _blocks():
  for page in PAGES:
    for i, code in enumerate(BLOCK.findall(page.read_text())):
      yield pytest.param(code, id=f"{page.relative_to(ROOT)}#{i}")


@pytest.mark.parametrize("code", list(_blocks()))
def test_doc_example_runs(code):
  exec(compile(code, "<doc>", "exec"), {"__name__": "__doc_example__"})


def _rst_roles():
  import importlib.util
  spec = importlib.util.spec_from_file_location(
      "rst_roles", ROOT / "docs_hooks" / "rst_roles.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_rst_roles_become_markdown():
  rst = _rst_roles()
  targets = {"optax_ortho.orthonormalize"}
  text = ("Uses :math:`U V^\\top` and :func:`orthonormalize`, :func:`~optax.chain`,\n"
          ":class:`optax.GradientTransformation`.\n\n"
          "  .. math::\n\n     a &= b \\\\\n     c &= d\n\n  After.")
  out = rst.convert(text, targets)
  assert "\\(U V^\\top\\)" in out
  assert "[`orthonormalize`][optax_ortho.orthonormalize]" in out
  assert "`chain`" in out and "`optax.GradientTransformation`" in out
  assert "  $$\n  \\begin{aligned}\n  a &= b \\\\\n  c &= d\n  \\end{aligned}\n  $$" in out
  assert "  After." in out and ":math:" not in out and ".. math::" not in out


def test_every_api_identifier_of_the_docs_exists():
  """The link targets the conversion uses are the API page's `::: name` lines."""
  import importlib
  for name in _rst_roles().api_identifiers():
    module, _, attr = name.rpartition(".")
    try:
      obj = importlib.import_module(name)
    except ImportError:
      obj = getattr(importlib.import_module(module), attr)
    assert obj is not None, name


def test_rst_links_examples_and_quote_lines_become_markdown():
  rst = _rst_roles()
  text = ("Summary.\n\nExample:\n  >>> x = 1\n\nReferences:\n  Someone, `A long\n"
          "  title <https://arxiv.org/abs/1>`_, 2022; `<https://b.org>`__.\n\n"
          "Holds $d(L)\n> 0$ always.")
  out = rst.convert(text, set())
  assert "\nExamples:\n  >>> x = 1\n" in out
  assert "[A long title](https://arxiv.org/abs/1), 2022" in out
  assert "[https://b.org](https://b.org)." in out
  assert "Holds $d(L) > 0$ always." in out
  # Already Google's `Examples:`, and indented `Example:` text: untouched.
  assert rst.convert("Examples:\n  >>> 1\n  1", set()) == "Examples:\n  >>> 1\n  1"
  assert rst.convert("  Example: a", set()) == "  Example: a"


GOOD_PAGE = ('<p>ok <code>:math:</code> \\(x\\) <a href="https://a.org">A</a></p>'
             '<div class="highlight"><pre><code><span class="gp">&gt;&gt;&gt; </span>1\n'
             '</code></pre></div><p><code>&gt;&gt;&gt;</code> in prose</p>')


@pytest.mark.parametrize("bad, kind", [
    ("<p>a :math:<code>x</code> and :func:<code>f</code></p>", "raw reST"),
    ("<p>see <code>A title &lt;https://a.org&gt;</code>_, 2022</p>", "raw reST"),
    # What `>>> import jax` becomes when Markdown reads it as text.
    ("<blockquote>\n<blockquote>\n<blockquote>\n<p>import jax</p>\n</blockquote>\n"
     "</blockquote>\n</blockquote>", "doctest"),
    ("<p>&gt;&gt;&gt; import jax</p>", "doctest"),
])
def test_raw_markup_check_fails_on_a_bad_page(tmp_path, bad, kind):
  rst = _rst_roles()
  (tmp_path / "ok.html").write_text(GOOD_PAGE)
  assert rst.raw_roles(tmp_path) == {}
  assert rst.main([str(tmp_path)]) == 0
  (tmp_path / "bad.html").write_text(GOOD_PAGE + bad)
  hits = rst.raw_roles(tmp_path)
  assert list(hits) == ["bad.html"]
  assert [k for k in hits["bad.html"] if k.startswith(kind)]
  assert rst.main([str(tmp_path)]) == 1


def test_raw_role_check_counts_each_role():
  rst = _rst_roles()
  found = rst.raw_markup("<p>a :math:<code>x</code> and :func:<code>f</code></p>")
  assert list(found.values()) == [2]


def _defaults():
  import importlib.util
  spec = importlib.util.spec_from_file_location(
      "defaults", ROOT / "examples" / "defaults.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_the_learning_rate_table_of_the_docs_is_the_examples_table():
  """docs/getting_started.md prints examples/defaults.py's table, row for row."""
  page = (ROOT / "docs" / "getting_started.md").read_text()
  section = page[page.index("## Learning rates"):]
  section = section[:section.index("\n## ")]
  rows = re.findall(r"^\| `(\w+)` \|[^|]*\| \**([0-9.e-]+)\**", section, re.M)
  assert {name: float(lr) for name, lr in rows} == _defaults().LEARNING_RATE


def test_the_first_snippet_uses_the_table():
  snippet = BLOCK.findall((ROOT / "docs" / "index.md").read_text())[0]
  rate = _defaults().LEARNING_RATE["orthogonal_sgd"]
  assert f"orthonormalize(), optax.sgd({rate}, momentum=0.9)" in snippet
