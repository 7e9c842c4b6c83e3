"""PyTorch/timm counterparts of our ViT: the same weights in timm, timm's blocks with ToMe
inserted (an independent reference of the merged model), a fast PyTorch ToMe to time against,
and timm's ViT of a variant.

    params = timm_to_params(timm_model)                           # timm weights -> our tree
    want = timm_forward_with_tome(timm_model, images_nhwc, rs)    # [B, classes] numpy logits
    logits = torch_tome_forward(timm_model, images_nchw, rs)      # torch tensors throughout

`timm_forward_with_tome` merges with the NumPy reference, one image at a time (slow, obviously
right); `torch_tome_forward` is the same model in batched torch ops for timing: the bipartite
matching and the size-weighted merge as tensor ops (sort, gather, scatter-add), proportional
attention as the bias of `scaled_dot_product_attention`.

torch and timm (the `test` extras) are imported inside the functions, so importing tome_jax
never needs them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tome_jax import numpy_reference as ref
from tome_jax.variants import decode_variant

# big_vision size names -> timm's, for timm.create_model(f"vit_{name}_patch{P}_{res}").
TIMM_NAMES = {"Ti": "tiny", "S": "small", "B": "base", "L": "large", "H": "huge"}


def _np(t: Any) -> np.ndarray:
    return t.detach().cpu().numpy().astype(np.float32)


def timm_to_params(model: Any) -> dict:
    """A small mapping of timm's VisionTransformer (class token, no distill) onto our names."""
    sd = {k: _np(v) for k, v in model.state_dict().items()}
    width = sd["cls_token"].shape[-1]
    heads = model.blocks[0].attn.num_heads
    params = {
        "embedding": {"kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
                      "bias": sd["patch_embed.proj.bias"]},
        "cls": sd["cls_token"] + sd["pos_embed"][:, :1],
        "pos_embedding": sd["pos_embed"][:, 1:],
        "head": {"kernel": sd["head.weight"].T, "bias": sd["head.bias"]},
    }
    transformer = {"encoder_norm": {"scale": sd["norm.weight"], "bias": sd["norm.bias"]}}
    for i in range(len(model.blocks)):
        p = f"blocks.{i}."
        qkv_w, qkv_b = sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"]
        attn = {}
        for j, name in enumerate(["query", "key", "value"]):
            w = qkv_w[j * width:(j + 1) * width]
            attn[name] = {"kernel": w.T.reshape(width, heads, -1),
                          "bias": qkv_b[j * width:(j + 1) * width].reshape(heads, -1)}
        attn["out"] = {"kernel": sd[p + "attn.proj.weight"].T.reshape(heads, -1, width),
                       "bias": sd[p + "attn.proj.bias"]}
        transformer[f"encoderblock_{i}"] = {
            "LayerNorm_0": {"scale": sd[p + "norm1.weight"], "bias": sd[p + "norm1.bias"]},
            "MultiHeadDotProductAttention_0": attn,
            "LayerNorm_1": {"scale": sd[p + "norm2.weight"], "bias": sd[p + "norm2.bias"]},
            "MlpBlock_0": {
                "Dense_0": {"kernel": sd[p + "mlp.fc1.weight"].T, "bias": sd[p + "mlp.fc1.bias"]},
                "Dense_1": {"kernel": sd[p + "mlp.fc2.weight"].T, "bias": sd[p + "mlp.fc2.bias"]},
            },
        }
    params["Transformer"] = transformer
    return params


def timm_forward_with_tome(model: Any, images_nhwc: np.ndarray, rs: list[int]) -> np.ndarray:
    """timm's own layers, with proportional attention and the NumPy ToMe merge per block.

    images_nhwc [B, H, W, 3] float32, rs: tokens merged in each block -> logits [B, classes].
    """
    import torch

    with torch.no_grad():
        x = model.patch_embed(torch.from_numpy(images_nhwc).permute(0, 3, 1, 2))
        x = model._pos_embed(x)
        size = torch.ones(x.shape[:2] + (1,))
        for blk, r in zip(model.blocks, rs, strict=True):
            attn = blk.attn
            y = blk.norm1(x)
            b, t, c = y.shape
            qkv = attn.qkv(y).reshape(b, t, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]
            logits = (q @ k.transpose(-2, -1)) * attn.scale + size.log()[:, None, None, :, 0]
            y = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, t, c)
            x = x + attn.proj(y)
            if r:
                metric = k.mean(1).numpy()
                xs, sizes = [], []
                for i in range(b):
                    kept, src, dst = ref.match(metric[i], r)
                    xi, si = ref.merge_wavg(x[i].numpy(), size[i].numpy(), kept, src, dst)
                    xs.append(xi)
                    sizes.append(si)
                x, size = torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(sizes))
            x = x + blk.mlp(blk.norm2(x))
        x = model.norm(x)
        return model.head(x[:, 0]).numpy()


def vit_b16_r0_logits() -> tuple[np.ndarray, np.ndarray]:
    """(ours, timm's) logits [2, 1000] of ViT-B/16 at r = 0 on the same random weights and
    images."""
    import jax
    import timm
    import torch

    from tome_jax.vit import ViT

    torch.manual_seed(0)
    ref_model = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
    torch.nn.init.normal_(ref_model.head.weight, std=0.02)  # timm zero-inits the head
    images = np.random.default_rng(1).standard_normal((2, 224, 224, 3)).astype(np.float32)
    with torch.no_grad():
        want = ref_model(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
    ours, _ = jax.jit(ViT(variant="B/16").apply)({"params": timm_to_params(ref_model)}, images)
    return np.asarray(ours), want


def timm_vit(variant: str, resolution: int, num_classes: int = 1000) -> Any:
    """timm's ViT of `variant` with random weights (r = 0; the weights don't change speed).

    Named timm models (`vit_base_patch16_224`, ...) where timm has the size, else timm's
    `VisionTransformer` built from the variant's sizes (e.g. "mu/4").
    """
    import timm
    from timm.models.vision_transformer import VisionTransformer

    dims = decode_variant(variant)
    name = f"vit_{TIMM_NAMES.get(variant.split('/')[0], '')}_patch{dims.patch_size}_224"
    if timm.is_model(name):
        return timm.create_model(name, pretrained=False, img_size=resolution,
                                 num_classes=num_classes)
    return VisionTransformer(img_size=resolution, patch_size=dims.patch_size,
                             embed_dim=dims.width, depth=dims.depth, num_heads=dims.num_heads,
                             mlp_ratio=dims.mlp_dim / dims.width, num_classes=num_classes)


def torch_match(metric: Any, r: int, class_token: bool = True) -> tuple[Any, Any, Any]:
    """`tome_jax.merge.match` in torch: metric [B, T, C] -> (unm_idx [B, Ta - r], src_idx
    [B, r], dst_idx [B, r]) int64, the same pairs (ties broken alike)."""
    import torch

    metric = metric.float()
    metric = metric / metric.norm(dim=-1, keepdim=True)
    scores = metric[:, ::2] @ metric[:, 1::2].transpose(1, 2)
    node_max, node_idx = scores.max(dim=-1)
    if class_token:
        node_max[:, 0] = -torch.inf
    edge_idx = torch.argsort(node_max, dim=-1, descending=True, stable=True)
    unm_idx, src_idx = edge_idx[:, r:], edge_idx[:, :r]
    if class_token:
        unm_idx = unm_idx.sort(dim=-1).values
    return unm_idx, src_idx, node_idx.gather(1, src_idx)


def torch_merge_wavg(x: Any, size: Any, matching: tuple[Any, Any, Any]) -> tuple[Any, Any]:
    """`tome_jax.merge.merge_wavg` in torch: x [B, T, C], size [B, T, 1] float32 ->
    ([B, T - r, C] in x's dtype, [B, T - r, 1]); x * size and size travel together, averaged
    in float32."""
    import torch

    unm_idx, src_idx, dst_idx = matching
    weighted = torch.cat([x.float() * size, size], dim=-1)
    channels = weighted.shape[-1]
    a, b = weighted[:, ::2], weighted[:, 1::2]

    def rows(idx: Any) -> Any:
        return idx[..., None].expand(-1, -1, channels)

    src = a.gather(1, rows(src_idx))
    merged = torch.cat([a.gather(1, rows(unm_idx)), b.scatter_add(1, rows(dst_idx), src)], 1)
    size = merged[..., -1:]
    return (merged[..., :-1] / size).to(x.dtype), size


def _torch_tome_block(block: Any, x: Any, size: Any, r: int) -> tuple[Any, Any]:
    """One timm Block with proportional attention and a merge of r tokens after attention."""
    import torch
    import torch.nn.functional as F

    attn = block.attn
    y = block.norm1(x)
    batch, tokens, _ = y.shape
    qkv = attn.qkv(y).reshape(batch, tokens, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    bias = None if size is None else size.log()[:, None, None, :, 0].to(q.dtype)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    x = x + block.ls1(attn.proj(y.transpose(1, 2).reshape(batch, tokens, -1)))
    if r:
        if size is None:
            size = x.new_ones(batch, tokens, 1, dtype=torch.float32)
        x, size = torch_merge_wavg(x, size, torch_match(k.mean(1), r))
    return x + block.ls2(block.mlp(block.norm2(x))), size


def torch_tome_forward(model: Any, images: Any, rs: list[int]) -> Any:
    """timm's VisionTransformer (class token, eval mode) with ToMe: images [B, 3, H, W] ->
    logits [B, classes], r = rs[i] tokens merged in block i (already clamped, as
    `ViT.token_schedule` gives them). Call it under `torch.inference_mode()` to time it."""
    x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
    size = None
    for block, r in zip(model.blocks, rs, strict=True):
        x, size = _torch_tome_block(block, x, size, r)
    return model.forward_head(model.norm(x))
