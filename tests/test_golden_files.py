"""tests/data: every golden file is small, loads without pickle, is finite and
is documented in tests/data/README.md with the commit it came from."""

import pathlib
import re

import numpy as np
import pytest

DATA = pathlib.Path(__file__).parent / "data"
FILES = sorted(DATA.glob("*.npz"))


def _sections():
  text = (DATA / "README.md").read_text()
  parts = re.split(r"^## `([^`]+)`", text, flags=re.M)
  return dict(zip(parts[1::2], parts[2::2]))


def test_there_are_golden_files():
  assert len(FILES) >= 5


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_golden_file(path):
  assert path.stat().st_size < 200_000
  section = _sections().get(path.name)
  assert section is not None, f"{path.name} has no section in tests/data/README.md"
  assert re.search(r"commit\s+`[0-9a-f]{40}`", section), f"{path.name}: no commit named"
  with np.load(path, allow_pickle=False) as data:
    assert data.files
    for name in data.files:
      arr = data[name]
      if arr.dtype.kind == "f":
        assert np.all(np.isfinite(arr)), f"{path.name}:{name} is not finite"
