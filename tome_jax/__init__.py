"""tome-jax: Token Merging (ToMe) for Vision Transformers in JAX/Flax.

    model, params, info = tome_jax.load_model(tome_jax.assets.shipped_model_dir(), r=8)
    model, params, info = tome_jax.pretrained("timm/vit_base_patch16_224.augreg2_in21k_ft_in1k")
"""

from tome_jax import assets
from tome_jax.checkpoint import load_model, save_model
from tome_jax.merge import bipartite_soft_matching, merge_source, merge_wavg
from tome_jax.pretrained_models import load_pretrained as pretrained
from tome_jax.schedule import flops, parse_r
from tome_jax.variants import decode_variant
from tome_jax.vit import ViT

__all__ = ["ViT", "assets", "bipartite_soft_matching", "decode_variant", "flops", "load_model",
           "merge_source", "merge_wavg", "parse_r", "pretrained", "save_model"]
__version__ = "0.1.0"
