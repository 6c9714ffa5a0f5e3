"""Docs-side conversion of reST markup in docstrings to what mkdocstrings renders.

The library's docstrings use reST roles (`:math:`, `:func:`, `:class:`,
`.. math::` blocks), reST links and doctest `Example:` sections that
mkdocstrings' Markdown shows literally (a doctest's `>>>` becomes three nested
blockquotes). This griffe extension (mkdocs.yml: mkdocstrings' `extensions`)
rewrites each docstring before it is parsed, without touching the modules:

- ``:math:`x` `` -> `\\(x\\)` (pymdownx.arithmatex, MathJax);
- a `.. math::` block -> a `$$ ... $$` display (in `aligned` when it uses `&`
  or a line break);
- ``:func:`x` ``, ``:class:`x` ``, ... -> an autorefs link `[`x`][x]` when `x`
  is on the API page (`docs/api.md`), else inline code; `~a.b.c` shows `c`;
- a reST link `` `Title <url>`_ `` -> the Markdown link `[Title](url)`;
- a wrapped line that starts with `>` joins the line before it (Markdown
  would open a blockquote);
- an `Example:` section heading -> `Examples:`, the Google-style section
  whose `>>>` lines griffe renders as highlighted code blocks (a docstring
  already saying `Examples:` is left as it is).

`python docs_hooks/rst_roles.py SITE_DIR` checks a built site: it exits 1 and
lists the pages that still show raw reST (a role, a math block, a reST link) or
a doctest rendered as text.
"""

from __future__ import annotations

import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
_XREF_ROLES = "func|class|meth|mod|attr|obj|exc|data|const|type"
INLINE_MATH = re.compile(r":math:`([^`]+)`")
XREF = re.compile(rf":(?:py:)?(?:{_XREF_ROLES}):`(~?)([^`]+)`")
MATH_BLOCK = re.compile(r"^(?P<indent>[ \t]*)\.\. math::[ \t]*(?P<first>.*)$")
# A reST hyperlink, possibly over several lines: `Title <https://...>`_ .
RST_LINK = re.compile(r"`([^`<]*?)\s*<([^<>`\s]+)>`__?")
# Docstrings are dedented before extensions see them: a section heading is at
# column 0.
EXAMPLE_HEADING = re.compile(r"^Example:[ \t]*$", re.M)
# What raw reST looks like in HTML once Markdown has turned its backticks into
# <code>: `:math:<code>x</code>` (or the backtick itself if it survived), and a
# link's `<code>Title &lt;url&gt;</code>_`.
RAW_ROLE_HTML = re.compile(
    rf":(?:py:)?(?:math|{_XREF_ROLES}):(?:<code>|`)|\.\. math::|&gt;(?:</code>|`)__?")
# A wrapped line that starts with `>` (`$x\n> 0$`) opens a Markdown blockquote.
QUOTE_LINE = re.compile(r"(?<=\S)\n[ \t]*(?=>(?!>>))")
# A doctest that Markdown took for text: `>>>` opens three nested blockquotes
# (or, escaped, stays as `&gt;&gt;&gt;` outside a code element). The docs
# pages have no blockquote of their own, so any is a docstring line gone wrong.
CODE_HTML = re.compile(r"<pre\b.*?</pre>|<code\b.*?</code>", re.S)
DOCTEST_AS_TEXT_HTML = re.compile(r"<blockquote>|&gt;&gt;&gt;")


def api_identifiers(api_page: pathlib.Path = ROOT / "docs" / "api.md") -> set[str]:
  """Identifiers rendered on the API page (`::: name` lines): valid link targets."""
  names = set()
  for line in api_page.read_text().splitlines():
    if line.startswith("::: "):
      names.add(line[4:].strip())
  return names


def _xref(match: re.Match, targets: set[str]) -> str:
  tilde, name = match.groups()
  name = name.strip()
  if "<" in name and name.endswith(">"):  # :func:`title <target>`
    title, name = name[:-1].split("<", 1)
    shown = title.strip()
  else:
    shown = name.rsplit(".", 1)[-1] if tilde else name
  target = name.rstrip("()")
  candidates = [target, f"optax_ortho.{target}"]
  for c in candidates:
    if c in targets:
      return f"[`{shown}`][{c}]"
  return f"`{shown}`"


def _math_blocks(text: str) -> str:
  lines = text.split("\n")
  out: list[str] = []
  i = 0
  while i < len(lines):
    m = MATH_BLOCK.match(lines[i])
    if not m:
      out.append(lines[i])
      i += 1
      continue
    indent = m.group("indent")
    body = [m.group("first")] if m.group("first").strip() else []
    i += 1
    while i < len(lines) and (not lines[i].strip()
                              or len(lines[i]) - len(lines[i].lstrip()) > len(indent)):
      body.append(lines[i].strip())
      i += 1
    while body and not body[-1]:
      body.pop()
    while body and not body[0]:
      body.pop(0)
    # A blank line ends a display in TeX; keep the equations together.
    body = [b for b in body if b]
    if any("&" in b or b.endswith("\\\\") or b == "\\\\" for b in body):
      body = ["\\begin{aligned}", *body, "\\end{aligned}"]
    out += [f"{indent}$$", *(f"{indent}{b}" for b in body), f"{indent}$$", ""]
  return "\n".join(out)


def convert(text: str, targets: set[str] | None = None) -> str:
  """`text` with its reST roles and math blocks in mkdocstrings' Markdown."""
  targets = api_identifiers() if targets is None else targets
  text = _math_blocks(text)
  text = INLINE_MATH.sub(lambda m: f"\\({m.group(1)}\\)", text)
  text = RST_LINK.sub(_link, text)
  text = EXAMPLE_HEADING.sub("Examples:", text)
  text = QUOTE_LINE.sub(" ", text)
  return XREF.sub(lambda m: _xref(m, targets), text)


def _link(match: re.Match) -> str:
  title, url = match.groups()
  return f"[{' '.join(title.split()) or url}]({url})"


def raw_markup(html: str) -> dict[str, int]:
  """Raw reST and doctests-as-text in one page's HTML, counted by kind."""
  counts = {"raw reST role, math block or link": len(RAW_ROLE_HTML.findall(html)),
            "doctest or `>` line rendered as text (blockquote)": len(
                DOCTEST_AS_TEXT_HTML.findall(CODE_HTML.sub("", html)))}
  return {kind: n for kind, n in counts.items() if n}


def raw_roles(site: pathlib.Path) -> dict[str, dict[str, int]]:
  """Pages of a built site that show raw markup (`raw_markup`), with the hits."""
  hits = {}
  for page in sorted(site.rglob("*.html")):
    found = raw_markup(page.read_text(errors="replace"))
    if found:
      hits[str(page.relative_to(site))] = found
  return hits


try:
  import griffe
except ImportError:  # only the check below is needed without the docs extra
  griffe = None

if griffe is not None:

  class RstRoles(griffe.Extension):
    """Rewrites every docstring of the loaded package (see the module docstring)."""

    def __init__(self) -> None:
      super().__init__()
      self._targets = api_identifiers()

    def _walk(self, obj, seen) -> None:
      if obj.is_alias or id(obj) in seen:
        return
      seen.add(id(obj))
      if obj.docstring is not None:
        obj.docstring.value = convert(obj.docstring.value, self._targets)
      for member in obj.members.values():
        self._walk(member, seen)

    def on_package(self, *, pkg, **kwargs) -> None:
      self._walk(pkg, set())


def main(argv: list[str]) -> int:
  if len(argv) != 1:
    print("usage: python docs_hooks/rst_roles.py SITE_DIR", file=sys.stderr)
    return 2
  site = pathlib.Path(argv[0])
  pages = list(site.rglob("*.html"))
  if not pages:
    print(f"no HTML pages under {site}: build the site first", file=sys.stderr)
    return 2
  hits = raw_roles(site)
  for page, found in hits.items():
    for kind, n in found.items():
      print(f"{page}: {n} x {kind}", file=sys.stderr)
  total = sum(n for found in hits.values() for n in found.values())
  print(f"checked {len(pages)} pages: {total} raw reST or doctest-as-text hits")
  return 1 if hits else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
