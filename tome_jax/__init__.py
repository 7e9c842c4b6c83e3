"""tome-jax: Token Merging (ToMe) for Vision Transformers in JAX/Flax."""

from tome_jax.merge import bipartite_soft_matching, merge_source, merge_wavg
from tome_jax.schedule import flops, parse_r
from tome_jax.variants import decode_variant
from tome_jax.vit import ViT

__all__ = ["ViT", "bipartite_soft_matching", "decode_variant", "flops", "merge_source",
           "merge_wavg", "parse_r"]
__version__ = "0.1.0"
