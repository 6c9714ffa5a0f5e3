# The generators import torch / tensorflow from a scratch venv (see ../README.md):
# pytest (with --doctest-modules) must not import them.
collect_ignore_glob = ["*.py"]
