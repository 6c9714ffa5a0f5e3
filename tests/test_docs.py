"""Every fenced ```python block of the docs and the README runs."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "docs").rglob("*.md")) + [ROOT / "README.md"]
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


def test_raw_role_check_finds_a_raw_role(tmp_path):
  rst = _rst_roles()
  (tmp_path / "ok.html").write_text("<p><code>:math:</code> as text, \\(x\\)</p>")
  assert rst.raw_roles(tmp_path) == {}
  (tmp_path / "bad.html").write_text("<p>a :math:<code>x</code> and :func:<code>f</code></p>")
  assert rst.raw_roles(tmp_path) == {"bad.html": 2}
  assert rst.main([str(tmp_path)]) == 1
