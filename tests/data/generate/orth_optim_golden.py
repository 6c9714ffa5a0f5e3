"""Golden numbers from the orthonormalised-gradient authors' released code
(MarkTuddenham/Orthogonal-Optimisers).

Runs `src/orth_optim/__init__.py` (`orthogonalise(torch.optim.SGD)` with
`orth=True`) in place; nothing of theirs is copied here. Usage (scratch venv
with torch 2.13.0 CPU; see tests/data/README.md):

  python tests/data/generate/orth_optim_golden.py /path/to/Orthogonal-Optimisers tests/data
"""

import os
import sys

import numpy as np
import torch


def main(repo, out_dir):
  sys.path.insert(0, os.path.join(repo, "src"))
  import orth_optim  # noqa: PLC0415 (theirs, from the checkout)

  gen = torch.Generator().manual_seed(2022)
  rank2 = (torch.randn(6, 2, generator=gen) @ torch.randn(2, 4, generator=gen))
  grads = {
      # torch nn.Linear weight layout (out, in)
      "linear_full": torch.randn(6, 4, generator=gen),
      "linear_wide": torch.randn(3, 5, generator=gen),
      "linear_rank2": rank2,
      "linear_zero": torch.zeros(6, 4),
      # torch nn.Conv2d weight layout (out, in, kh, kw)
      "conv_full": torch.randn(4, 3, 2, 2, generator=gen),
      # a bias: ndim 1, left alone by their code
      "bias": torch.randn(4, generator=gen),
  }
  params = {k: torch.nn.Parameter(torch.randn(v.shape, generator=gen))
            for k, v in grads.items()}
  before = {k: p.detach().clone() for k, p in params.items()}
  for k, p in params.items():
    p.grad = grads[k].clone()
  sgd = orth_optim.orthogonalise(torch.optim.SGD)
  opt = sgd(list(params.values()), lr=1.0, orth=True)
  opt.step()
  out = {}
  for k, p in params.items():
    out[f"{k}_grad"] = grads[k].numpy()
    out[f"{k}_orth"] = p.grad.detach().numpy()
    out[f"{k}_update"] = (p.detach() - before[k]).numpy()
  np.savez(os.path.join(out_dir, "orth_optim.npz"), **out)


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2])
