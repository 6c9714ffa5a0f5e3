"""Every snippet of docs/training_loop.md runs, and checks what it shows.

The snippets are whole training programs (on 8 virtual CPU devices here, for
the data-parallel ones): 4-140 s each on 2 busy cores, so running them is slow.
"""

import pathlib
import re

import pytest

PAGE = pathlib.Path(__file__).resolve().parents[1] / "docs" / "training_loop.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
HEADING = re.compile(r"^## (.*)$", re.M)


def _blocks():
  text = PAGE.read_text()
  headings = [(m.start(), m.group(1)) for m in HEADING.finditer(text)]
  for i, match in enumerate(BLOCK.finditer(text)):
    code = match.group(1)
    section = [h for start, h in headings if start < match.start()][-1]
    slug = re.sub(r"[^a-z0-9]+", "-", section.lower()).strip("-")
    yield pytest.param(code, id=f"{i}-{slug}")


BLOCKS = list(_blocks())


def test_page_has_the_sections_users_look_for():
  sections = " ".join(HEADING.findall(PAGE.read_text())).lower()
  for topic in ("trainstate", "nnx.optimizer", "pmap", "sharded", "schedules",
                "embeddings", "weight decay", "opt layers", "l2-sp", "separate jitted"):
    assert topic in sections, topic


@pytest.mark.parametrize("code", [p.values[0] for p in BLOCKS],
                         ids=[p.id for p in BLOCKS])
def test_every_snippet_checks_its_claim(code):
  assert re.search(r"^\s*(assert|np\.testing\.assert)", code, re.M), code[:200]


@pytest.mark.slow
@pytest.mark.parametrize("code", BLOCKS)
def test_snippet_runs(code):
  exec(compile(code, str(PAGE), "exec"), {"__name__": "__doc_example__"})
