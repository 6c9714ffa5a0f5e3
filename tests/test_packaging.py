"""The distribution: its extras, and (in CI's wheel run) what the installed wheel holds.

CI (`.ci/run`) installs the wheel into a fresh environment and runs the tests
from a copy of the repository without `optax_ortho/`, with
`OPTAX_ORTHO_FROM_WHEEL=1`; an editable install's metadata is from the time it
was installed, so the metadata checks run only there.
"""

import importlib.metadata
import os
import pathlib
import tomllib

import pytest

import optax_ortho

ROOT = pathlib.Path(__file__).resolve().parents[1]
FROM_WHEEL = bool(os.environ.get("OPTAX_ORTHO_FROM_WHEEL"))
wheel_only = pytest.mark.skipif(not FROM_WHEEL, reason="CI's wheel run only")


def test_testing_is_an_extra_with_hypothesis_and_test_includes_it():
  extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
      "optional-dependencies"]
  assert [r for r in extras["testing"] if r.startswith("hypothesis")]
  assert [r for r in extras["test"] if r.startswith("optax-ortho[") and "testing" in r]


def test_the_package_is_typed():
  assert (pathlib.Path(optax_ortho.__file__).parent / "py.typed").is_file()


@wheel_only
def test_the_wheel_run_imports_the_installed_package():
  package = pathlib.Path(optax_ortho.__file__).resolve().parent
  assert "site-packages" in package.parts, package
  assert not package.is_relative_to(ROOT), package


@wheel_only
def test_the_wheel_has_the_package_version_and_the_testing_extra():
  assert importlib.metadata.version("optax-ortho") == optax_ortho.__version__
  requires = importlib.metadata.requires("optax-ortho") or []
  assert [r for r in requires if r.startswith("hypothesis") and 'extra == "testing"' in r]
