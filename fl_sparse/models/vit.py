"""A small timm ``VisionTransformer`` for 32x32 CIFAR images, sized by gin for a 2-core CPU.

Which of its tensors are masked, and how its FLOPs are counted, is decided model-agnostically in
:func:`fl_sparse.models.maskable_names` and :mod:`fl_sparse.training.accounting` (docs/design.md, "Sparse masks on
transformers"): the qkv, projection, MLP, patch-embedding and head weights are masked; norms, position
embedding, class token and biases stay dense; attention's two weightless products count as dense.
"""

from __future__ import annotations

import os

import gin
from torch import nn

from fl_sparse.core.errors import check


@gin.configurable("ViT32")
def vit32(num_classes: int, depth: int = 4, embed_dim: int = 64, num_heads: int = 4, patch_size: int = 8,
          mlp_ratio: float = 4.0) -> nn.Module:
    """timm's ``VisionTransformer`` at 32x32 inputs: ``(32 / patch_size)**2`` patch tokens plus a class token,
    ``depth`` pre-norm blocks of width ``embed_dim`` with ``num_heads`` heads, a linear head on the class
    token. Randomly initialised (timm's default init, never pretrained weights), no dropout, so that the
    Vectorized executor can batch it. The defaults are the ``cifar10_vit`` preset's, chosen so that a FedDST
    round of the paper's LeNet setting stays within ~10 s on a 2-core CPU (7.5 CPU-seconds on one thread,
    docs/benchmarks.md)."""
    check(32 % patch_size == 0, f"ViT32.patch_size={patch_size} must divide 32 (e.g. 4 or 8)")
    check(embed_dim % num_heads == 0, f"ViT32.embed_dim={embed_dim} must be a multiple of ViT32.num_heads={num_heads}")
    check(depth >= 1, f"ViT32.depth={depth} must be >= 1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=32, patch_size=patch_size, num_classes=num_classes, embed_dim=embed_dim,
                             depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio)
