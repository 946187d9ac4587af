"""GPT-2-style pre-norm transformer block from torch.nn, converted with replace_norms.

Builds the block with random weights, copies it, converts the copy with
``layernorm_ext.replace_norms``, compares outputs, and times both on this machine:

    python examples/gpt2_block.py [--dtype bf16] [--seq 256] [--batch 4]
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch import nn
from torch.utils.benchmark import Timer

import layernorm_ext


class GPT2Block(nn.Module):
    """ln_1 -> causal self-attention -> residual; ln_2 -> MLP (4x, GELU) -> residual."""

    def __init__(self, d_model: int = 768, n_head: int = 12) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d_model, eps=1e-5)
        self.attn = nn.MultiheadAttention(d_model, n_head, batch_first=True)
        self.ln_2 = nn.LayerNorm(d_model, eps=1e-5)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model),
            nn.GELU(approximate="tanh"),
            nn.Linear(4 * d_model, d_model),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        mask = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool, device=x.device).triu(1)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]

    torch.manual_seed(0)
    original = GPT2Block().to(dtype).eval()
    converted = copy.deepcopy(original)
    replaced = layernorm_ext.replace_norms(converted)
    x = torch.randn(args.batch, args.seq, 768, dtype=dtype)

    with torch.inference_mode():
        ref, out = original(x), converted(x)
        diff = (out.float() - ref.float()).abs().max().item()
        timings = {}
        for name, model in (("torch.nn", original), ("layernorm_ext", converted)):
            timer = Timer("model(x)", globals={"model": model, "x": x})
            t = timer.blocked_autorange(min_run_time=1.0)
            timings[name] = t.median * 1e3
        # The norms alone, as the block calls them.
        ln_t = Timer("m(x)", globals={"m": original.ln_1, "x": x}).blocked_autorange(
            min_run_time=0.5
        )
        ln_o = Timer("m(x)", globals={"m": converted.ln_1, "x": x}).blocked_autorange(
            min_run_time=0.5
        )

    print(
        f"replaced {replaced} norm modules; {args.batch}x{args.seq}x768 {args.dtype}, "
        f"{torch.get_num_threads()} threads, CPU kernels: {layernorm_ext.cpu_capability()}"
    )
    print(f"max |converted - original| = {diff:.3g}")
    print(
        f"block:     torch.nn {timings['torch.nn']:.2f} ms, "
        f"layernorm_ext {timings['layernorm_ext']:.2f} ms "
        f"({timings['torch.nn'] / timings['layernorm_ext']:.2f}x)"
    )
    print(
        f"LayerNorm: torch.nn {ln_t.median * 1e6:.1f} us, layernorm_ext {ln_o.median * 1e6:.1f} us "
        f"({ln_t.median / ln_o.median:.2f}x)"
    )


if __name__ == "__main__":
    main()
