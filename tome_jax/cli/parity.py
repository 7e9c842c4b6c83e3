"""Prints our ViT's parity with timm on the same random weights (needs the `test` extras).

    python -m eval.parity

r = 0: ViT-B/16 against timm's `vit_base_patch16_224`; r > 0: ViT-Ti/16 against timm's own
layers with the NumPy re-derivation of the merge inserted (`tome_jax.torch_reference`).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import jax
import numpy as np

from tome_jax.cli.args import make_parser, run
from tome_jax.torch_reference import timm_forward_with_tome, timm_to_params, vit_b16_r0_logits
from tome_jax.vit import ViT


def _print_parity(_: argparse.Namespace) -> None:
    import timm  # without it (or torch): one `error:` line naming the extra (args.run)

    ours, want = vit_b16_r0_logits()
    print(f"ViT-B/16 r=0: max abs logit difference {np.abs(ours - want).max():.2e}"
          f" (logit std {want.std():.2f})")
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10,
                            img_size=96).eval()
    params = timm_to_params(ref)
    x = np.random.default_rng(0).standard_normal((2, 96, 96, 3)).astype(np.float32)
    for r in [4, (8, -1)]:
        model = ViT(variant="Ti/16", num_classes=10, r=r)
        ours, _ = jax.jit(model.apply)({"params": params}, x)
        want = timm_forward_with_tome(ref, x, model.token_schedule(96)[0])
        print(f"ViT-Ti/16 @96 r={r}: max abs logit difference "
              f"{np.abs(np.asarray(ours) - want).max():.2e}")


def build_parser() -> argparse.ArgumentParser:
    return make_parser("python -m eval.parity", __doc__)


def main(argv: Sequence[str] | None = None) -> None:
    run(build_parser(), _print_parity, argv)
