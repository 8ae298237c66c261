"""Triton kernels of nvg, installed as `nvg.kernels`: block-structured attention and a static KV cache."""
from .block_attn import block_attention, block_attention_ref, block_mask
from .kv_cache import KVCache

__all__ = ["block_attention", "block_attention_ref", "block_mask", "KVCache"]
