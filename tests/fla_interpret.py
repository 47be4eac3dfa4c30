"""Run by test_fla.py in a subprocess: fla-core's Gated DeltaNet kernels on CPU tensors under Triton's
interpreter (TRITON_INTERPRET=1, numpy), against our torch ops; prints one JSON line of max differences.

Two patches to Triton (none to fla) make the interpreter run them:
  1. the autotuner would benchmark its configs, which needs a GPU driver: keep the first config;
  2. the interpreter runs `for i in range(n)` with a Python int `i`, and fla calls `i.to(tl.int64)`: rebind the
     loop variable as a tensor at the top of each loop body (the interpreter's own assignment rule does that).
"""
import ast
import json
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

try:
    import triton.runtime.autotuner as autotuner
    import triton.runtime.interpreter as interpreter
except ImportError:
    print('{"skip": "triton is not installed"}')
    sys.exit(0)

_prune = autotuner.Autotuner.prune_configs
autotuner.Autotuner.prune_configs = lambda self, kwargs, *a, **kw: _prune(self, kwargs, *a, **kw)[:1]


def _visit_for(self, node):
    node = self.generic_visit(node)
    it = node.iter
    if isinstance(it, ast.Call) and getattr(it.func, "id", getattr(it.func, "attr", None)) == "range" \
            and isinstance(node.target, ast.Name):
        name = node.target.id
        node.body.insert(0, self.visit_Assign(ast.Assign(targets=[ast.Name(name, ast.Store())],
                                                         value=ast.Name(name, ast.Load()))))
        ast.fix_missing_locations(node)
    return node


interpreter.ASTTransformer.visit_For = _visit_for

import torch  # noqa: E402

from qwen36.ops.gated_delta import fla_kernels, gated_delta_chunked, gated_delta_fla, gated_delta_reference  # noqa: E402


def case(B, H, T, K, V, seed):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.nn.functional.normalize(torch.randn(B, H, T, K, generator=g), dim=-1) for _ in range(2))
    q = q * K ** -0.5
    v = torch.randn(B, H, T, V, generator=g)
    decay = torch.nn.functional.logsigmoid(torch.randn(B, H, T, generator=g) + 2)
    beta = torch.sigmoid(torch.randn(B, H, T, generator=g))
    state = torch.randn(B, H, K, V, generator=g) * 0.5
    return q, k, v, decay, beta, state


def main():
    if fla_kernels() is None:
        print(json.dumps({"skip": "fla-core is not installed (pip install -e '.[test]' installs it)"}))
        return
    out = []
    for (B, H, T, K, V) in [(1, 2, 1, 16, 16), (2, 2, 5, 16, 24), (1, 4, 70, 32, 16)]:
        args = case(B, H, T, K, V, seed=T)
        want_o, want_s = gated_delta_reference(*args)
        ours_o, _ = gated_delta_chunked(*args)
        before = args[5].clone()
        for recurrent in (False, True):
            if recurrent and T > 5:          # the interpreter runs the recurrence as a Python loop: slow
                continue
            o, s = gated_delta_fla(*args, recurrent=recurrent)
            out.append({"shape": [B, H, T, K, V], "recurrent": recurrent, "shape_ok": list(o.shape) == list(want_o.shape),
                        "o": (o - want_o).abs().max().item(), "state": (s - want_s).abs().max().item(),
                        "vs_chunked": (o - ours_o).abs().max().item(), "state_kept": torch.equal(args[5], before)})
    print(json.dumps({"cases": out}))


if __name__ == "__main__":
    sys.exit(main())
