"""The native MatFormer decoder LM ("MatLM"): the whole forward pass in one file.

Pre-norm decoder blocks (RMSNorm), causal self-attention through torch SDPA, learned absolute
positions and a nested GELU FFN. Layer `i` at width `m` uses rows `[:m]` of the up projection
and columns `[:, :m]` of the down projection, which equals masking neurons `m:` to zero.
Widths are passed explicitly per layer on every call; width 0 skips the FFN (and its norm).

The same class holds universal checkpoints (every layer stores `d_ff` neurons) and sliced,
exported ones (layer `i` stores `config.ffn_widths[i]` neurons, possibly 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mnm_search.config import ModelConfig, validate_widths


@dataclass
class KVCache:
    """Pre-allocated keys and values for incremental decoding; `length` tokens are filled."""

    keys: torch.Tensor  # [n_layers, batch, n_heads, max_seq_len, head_dim]
    values: torch.Tensor  # same shape as keys
    length: int = 0

    @classmethod
    def empty(
        cls,
        config: ModelConfig,
        *,
        batch: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> KVCache:
        shape = (config.n_layers, batch, config.n_heads, config.max_seq_len, config.head_dim)
        return cls(
            keys=torch.zeros(shape, device=device, dtype=dtype),
            values=torch.zeros(shape, device=device, dtype=dtype),
        )


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=False)

    def forward(
        self, x: torch.Tensor, *, cache: KVCache | None = None, layer: int = 0
    ) -> torch.Tensor:
        batch, seq, d_model = x.shape
        head_dim = d_model // self.n_heads
        q, k, v = self.qkv(x).split(d_model, dim=-1)
        # [B, T, D] -> [B, H, T, head_dim]
        q = q.view(batch, seq, self.n_heads, head_dim).transpose(1, 2)
        k = k.view(batch, seq, self.n_heads, head_dim).transpose(1, 2)
        v = v.view(batch, seq, self.n_heads, head_dim).transpose(1, 2)
        if cache is None or cache.length == 0:
            if cache is not None:
                cache.keys[layer, :batch, :, :seq] = k
                cache.values[layer, :batch, :, :seq] = v
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            start, end = cache.length, cache.length + seq
            cache.keys[layer, :batch, :, start:end] = k
            cache.values[layer, :batch, :, start:end] = v
            keys = cache.keys[layer, :batch, :, :end]  # [B, H, end, head_dim]
            values = cache.values[layer, :batch, :, :end]
            if seq == 1:
                y = F.scaled_dot_product_attention(q, keys, values)
            else:
                # New query i sits at absolute position start+i and may see keys 0..start+i.
                positions = torch.arange(end, device=x.device)
                mask = positions[None, :] <= (start + torch.arange(seq, device=x.device))[:, None]
                y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        # [B, H, T, head_dim] -> [B, T, D]
        y = y.transpose(1, 2).reshape(batch, seq, d_model)
        return self.proj(y)


class NestedFFN(nn.Module):
    """GELU FFN whose first `m` hidden neurons form a working smaller FFN for every `m`."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.up = nn.Linear(d_model, hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor, width: int) -> torch.Tensor:
        if width == self.up.out_features:
            return self.down(F.gelu(self.up(x)))
        hidden = F.gelu(F.linear(x, self.up.weight[:width]))  # [B, T, width]
        return F.linear(hidden, self.down.weight[:, :width])


class Block(nn.Module):
    def __init__(self, config: ModelConfig, ffn_width: int) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.attn = CausalSelfAttention(config)
        # A layer sliced to width 0 stores no FFN at all.
        self.ffn_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps) if ffn_width else None
        self.ffn = NestedFFN(config.d_model, ffn_width) if ffn_width else None

    def forward(
        self, x: torch.Tensor, width: int, *, cache: KVCache | None = None, layer: int = 0
    ) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cache=cache, layer=layer)
        if width > 0 and self.ffn is not None and self.ffn_norm is not None:
            x = x + self.ffn(self.ffn_norm(x), width)
        return x


class MatLM(nn.Module):
    """MatFormer language model. `forward(ids, widths=[...])` runs any Mix'n'Match config."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.wpe = nn.Embedding(config.max_seq_len, config.d_model)
        self.blocks = nn.ModuleList(Block(config, w) for w in config.physical_widths)
        self.norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        # GPT-2 style: scale residual output projections by depth for a stable start.
        for name, param in self.named_parameters():
            if name.endswith(("attn.proj.weight", "ffn.down.weight")):
                nn.init.normal_(param, mean=0.0, std=0.02 / (2 * config.n_layers) ** 0.5)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(
        self,
        input_ids: torch.Tensor,
        widths: Sequence[int] | None = None,
        *,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Logits `[batch, seq, vocab]` for `input_ids` `[batch, seq]`.

        `widths` defaults to the stored widths (the full universal model, or the dense
        exported one). With `cache`, `input_ids` continue the cached sequence and the cache
        is extended in place (incremental decoding).
        """
        widths = (
            self.config.physical_widths if widths is None else validate_widths(widths, self.config)
        )
        seq = input_ids.shape[1]
        start = cache.length if cache is not None else 0
        if start + seq > self.config.max_seq_len:
            raise ValueError(
                f"sequence of {start + seq} tokens exceeds max_seq_len={self.config.max_seq_len}"
            )
        positions = torch.arange(start, start + seq, device=input_ids.device)
        x = self.wte(input_ids) + self.wpe(positions)  # [B, T, D]
        for layer, (block, width) in enumerate(zip(self.blocks, widths)):
            x = block(x, width, cache=cache, layer=layer)
        if cache is not None:
            cache.length = start + seq
        return self.lm_head(self.norm(x))
