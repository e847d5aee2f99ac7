"""The symmetry acceptance checks of tests/test_hf_matrix.py over timm models (optional, not CI).

For each model (random weights, small configs, nothing downloaded): ``infer_spec`` time, the
parameter coverage and the tensors left unpermuted, the attention groups, whether a random
permutation keeps the logits (relative 1e-5, in float64), and (``--planted``) whether default
``weight_matching`` recovers a planted permutation. timm needs torchvision; a separate venv
works (torch 2.14.1 here, which also exercises the tracer on the newest torch)::

    python -m venv /work/venvs/t214 && /work/venvs/t214/bin/pip install \\
        torch==2.14.1 torchvision==0.29.1 timm scipy rich numpy
    PYTHONPATH=src /work/venvs/t214/bin/python experiments/timm_matrix.py --planted \\
        --out docs/results/timm_matrix.md

Use ``--models NAME ...`` for a subset (names from ``MODELS`` below).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import modeconn as mc  # noqa: E402
from hf_zoo import coverage, planted_misses, randomize, symmetry_error, uncovered  # noqa: E402

# name -> (timm.create_model kwargs, image size); small variants so the run takes minutes
MODELS: dict[str, tuple[dict, int]] = {
    "resnet18": ({}, 32),
    "resnet50": ({}, 32),
    "mobilenetv2_050": ({}, 32),
    "mobilenetv3_small_050": ({}, 32),
    "efficientnet_b0": ({}, 32),
    "regnetx_002": ({}, 32),
    "densenet121": ({}, 32),
    "convnext_atto": ({}, 32),
    "vit_tiny_patch16_224": ({"img_size": 32, "patch_size": 8, "depth": 2}, 32),
    "deit_tiny_patch16_224": ({"img_size": 32, "patch_size": 8, "depth": 2}, 32),
    "swin_tiny_patch4_window7_224": ({"img_size": 56, "depths": (1, 1), "num_heads": (3, 6),
                                      "embed_dim": 48}, 56),
    "mixer_s16_224": ({"img_size": 32}, 32),
    "beit_base_patch16_224": ({"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 48,
                               "num_heads": 4}, 32),
    "levit_128s": ({"img_size": 64}, 64),
    "coat_lite_tiny": ({"img_size": 32}, 32),
}  # fmt: skip


class Logits(torch.nn.Module):
    """timm models take one positional tensor; the matrix's helpers pass keyword inputs."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _sym_err(model: torch.nn.Module, inputs: dict, spec: mc.PermutationSpec) -> float:
    """In float64: deep random nets reach logits of 1e2..1e4, where float32 rounding alone
    differs by 1e-2 between two orders of summation."""
    m64 = copy.deepcopy(model).double()
    return symmetry_error(m64, {k: v.double() for k, v in inputs.items()}, spec)


def check(name: str, planted: bool) -> dict[str, str]:
    import timm

    kw, size = MODELS[name]
    torch.manual_seed(0)
    model = randomize(Logits(timm.create_model(name, pretrained=False, num_classes=3, **kw)).eval())
    inputs = {"x": torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))}
    t = time.perf_counter()
    spec = mc.infer_spec(model, inputs, verify=False)
    secs = time.perf_counter() - t
    row = {
        "model": name,
        "params": f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M",
        "infer_spec s": f"{secs:.2f}",
        "groups": str(len(spec.groups)),
        "attention": str(len(spec.heads)),
        "coverage": f"{coverage(spec, model):.4f}",
        "unpermuted": ", ".join(k.removeprefix("model.") for k in uncovered(spec, model)[:4]),
        "symmetry err": f"{_sym_err(model, inputs, spec):.1e}" if spec.groups else "-",
    }
    if planted and spec.groups:
        missed = planted_misses(spec, model.state_dict())
        row["planted"] = "ok" if not missed else f"{len(missed)} tensors missed"
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=list(MODELS))
    ap.add_argument("--planted", action="store_true", help="also run planted weight matching")
    ap.add_argument("--out", type=Path, help="write the table as markdown here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name in args.models:
        try:
            rows.append(check(name, args.planted))
        except Exception as e:  # noqa: BLE001 -- one line per failing model, keep going
            where = traceback.extract_tb(e.__traceback__)[-1]
            rows.append({"model": name, "error": f"{type(e).__name__}: {e} ({where.name})"[:160]})
        print(rows[-1], flush=True)
    cols = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(r.get(c, "") for c in cols) + " |" for r in rows]
    table = "\n".join(lines)
    print(f"\ntorch {torch.__version__}\n{table}")
    if args.out:
        args.out.write_text(f"# timm symmetry matrix (torch {torch.__version__})\n\n{table}\n")


if __name__ == "__main__":
    main()
