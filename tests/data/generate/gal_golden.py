"""Golden numbers from the GAL authors' released code (luoyan407/gradient_adjustment).

Runs `cifar/src/adjustment.py` `Optimization_wrapper(method='gal').process`
in place; nothing of theirs is copied here. Usage (scratch venv with
torch 2.13.0 CPU; see tests/data/README.md):

  python tests/data/generate/gal_golden.py /path/to/gradient_adjustment tests/data

Calling-side adaptations only: `Tensor.cuda` is made the identity (their code
calls `.cuda()`; there is no GPU here); the criterion passed in records the
losses it returns; `Tensor.backward` records the tensors it is called on, and
a forward hook records the adjuster's raw output, so the intermediate values
of their function can be stored.
"""

import importlib.util
import os
import sys

import numpy as np
import torch
from torch import nn


def load(repo):
  path = os.path.join(repo, "cifar", "src", "adjustment.py")
  spec = importlib.util.spec_from_file_location("gal_adjustment", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


torch.Tensor.cuda = lambda self, *args, **kwargs: self
_backward = torch.Tensor.backward
_BACKWARD_CALLS = []


def _recording_backward(self, gradient=None, *args, **kwargs):
  _BACKWARD_CALLS.append(self.detach().clone())
  return _backward(self, gradient, *args, **kwargs)


torch.Tensor.backward = _recording_backward


def run_case(adj, seed, batch, classes, arch, logit_scale, lr, gal_scale,
             gal_ratio):
  torch.manual_seed(seed)
  logits = (logit_scale * torch.randn(batch, classes)).requires_grad_(True)
  target = torch.randint(0, classes, (batch,))
  regressor = adj.RNet(classes, list(arch))
  params0 = {n: p.detach().clone().numpy()
             for n, p in regressor.named_parameters()}
  raw = []
  regressor.register_forward_hook(lambda m, i, o: raw.append(o.detach().clone()))
  ce = nn.CrossEntropyLoss()
  losses = []

  def criterion(x, t):
    out = ce(x, t)
    losses.append(out.detach().clone())
    return out

  wrapper = adj.Optimization_wrapper(method="gal", gal_ratio=gal_ratio)
  del _BACKWARD_CALLS[:]
  loss_val = wrapper.process(criterion, logits, target, regressor,
                             lr=lr * gal_scale)
  res = {
      "logits": logits.detach().numpy(),
      "target": target.numpy().astype(np.int32),
      "lr": np.float32(lr), "gal_scale": np.float32(gal_scale),
      "gal_ratio": np.float32(gal_ratio),
      "loss": np.float32(loss_val),
      "loss_tentative": losses[1].numpy(),
      "adjuster_loss": _BACKWARD_CALLS[1].numpy(),
      "adjuster_output": raw[0].numpy(),
      "logit_grad": logits.grad.detach().numpy(),
      "accepted": np.bool_(losses[1].item() <= losses[0].item()),
  }
  for n, v in params0.items():
    res[f"adjuster_{n}"] = v
  for n, p in regressor.named_parameters():
    res[f"adjuster_grad_{n}"] = p.grad.detach().numpy()
  return res


def main(repo, out_dir):
  adj = load(repo)
  out = {}
  common = dict(batch=6, classes=5, arch=(8, 4), logit_scale=2.0, gal_scale=1.0)
  cases = {
      "accept": dict(seed=0, lr=0.5, gal_ratio=0.5, **common),
      # The batch passes, samples 1, 4 and 5 alone would not.
      "mixed": dict(seed=2, lr=0.5, gal_ratio=5.0, **common),
      "reject": dict(seed=5, lr=0.5,
                     gal_ratio=5.0, **common),
  }
  for name, kw in cases.items():
    res = run_case(adj, **kw)
    print(name, "accepted", bool(res["accepted"]), "loss", res["loss"],
          "tentative", res["loss_tentative"])
    for k, v in res.items():
      out[f"{name}_{k}"] = v
    out[f"{name}_seed"] = np.int32(kw["seed"])
  np.savez(os.path.join(out_dir, "gal_adjustment.npz"), **out)


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2])
