"""The 6-layer encoder-decoder Transformer of App. D.2 (Tables 9 and 10) for Multi30k translation.

Layout: the code the paper builds on (Pufferfish's ``low_rank_transformer``, itself
jadore801120/attention-is-all-you-need-pytorch). Post-layer-norm blocks: every attention and
feed-forward sub-layer computes ``LayerNorm(x + Dropout(sublayer(x)))`` with eps 1e-6; each stack
first applies dropout and a layer norm to ``embedding + sinusoidal positions``. Attention has no
biases (W_Q, W_K, W_V, W_O: ``wq``, ``wk``, ``wv``, ``wo``, plain ``nn.Linear`` so ``lod.factorize``
turns them into LoD linears); the feed-forward ``w1``, ``w2`` have biases. One 9,521 x 512 matrix E
(padding index 1) embeds the source and the target tokens and is the output projection:
``logits = h E^T / sqrt(d)`` (the paper's code scales tied logits by d^-1/2). The projection is a
parameter-free module (``TiedProjection``), not an ``nn.Linear``, so factorizing never unties it:
the paper factorizes attention and feed-forward weights only (Sec. 3.2).

Parameters at the default sizes (d = 512, f = 2,048, V = 9,521), each shared tensor counted once:
  E, V x d                                                                  4,874,752
  6 encoder layers x (attention 4 d^2 + FFN 2 d f + f + d + 2 layer norms 4 d)    18,902,016
  6 decoder layers x (attention 8 d^2 + FFN 2 d f + f + d + 3 layer norms 6 d)    25,199,616
  2 stack layer norms, 4 d                                                      2,048
  total                                                                    48,978,432
which is Table 2's 48.98M. Tables 3 and 14 report 53.9M for the same non-factorized model; the
gap, 4.87M, is V x d: 48,978,432 + 4,874,752 = 53,853,184, the tied matrix counted a second time
(as the output projection, as a counter that adds up every Linear's weight would see it). The
paper does not say how it counted; we count each tensor once (``footprint.measure`` deduplicates
shared parameters), so ``measure`` reports 48,978,432.

MACs depend on the sentence lengths S (source) and T (target), which the paper does not state:
  MACs(S, T) = 6 (6 d^2 + 2 d f) (S + T) + d V T                          (linear layers)
             + 6 x 2 d (S^2 + T^2 + T S)                                    (Q K^T and A V)
(the encoder's 4 attention and 2 feed-forward matrices act on S positions; the decoder's cross
attention applies W_K and W_V to the S memory positions and the other 6 matrices to T), with
d = 512, f = 2,048, V = 9,521: 22,020,096 S + 26,894,848 T + 6,144 (S^2 + T^2 + T S).
At S = T = 28 the linear layers alone give 1,369,618,432, Table 14's 1.370 GMACs; with the
attention products (counted here, through ``footprint.register_macs``) it is 1,384,069,120.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..footprint import register_macs

__all__ = ["PAD_INDEX", "PositionalEncoding", "MultiHeadAttention", "FeedForward", "EncoderLayer",
           "DecoderLayer", "Encoder", "Decoder", "TiedProjection", "Transformer"]

PAD_INDEX = 1  # Table 9: padding index of the shared embedding


class PositionalEncoding(nn.Module):
    """Adds the fixed sinusoidal table: PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(same)."""

    def __init__(self, d_model: int, max_len: int):
        super().__init__()
        position = torch.arange(max_len, dtype=torch.float64)[:, None]  # (L, 1)
        exponent = 2 * (torch.arange(d_model) // 2) / d_model  # (d,)
        angle = position / torch.pow(10000.0, exponent.to(torch.float64))  # (L, d)
        table = torch.empty(max_len, d_model, dtype=torch.float64)
        table[:, 0::2] = angle[:, 0::2].sin()
        table[:, 1::2] = angle[:, 1::2].cos()
        # Not a parameter, and not state: rebuilt from (d_model, max_len), so it never travels.
        self.register_buffer("table", table.to(torch.get_default_dtype()), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[1]
        if length > self.table.shape[0]:
            raise ValueError(f"PositionalEncoding: sequence length {length} exceeds max_len={self.table.shape[0]}; "
                             "build the Transformer with a larger max_len")
        return x + self.table[:length].to(x.dtype)  # (B, L, d)


class MultiHeadAttention(nn.Module):
    """LayerNorm(x + Dropout(W_O concat_h softmax(Q_h K_h^T / sqrt(d_k)) V_h)), Q = x W_Q, K/V = memory W_K/W_V.

    The projections are plain ``nn.Linear`` (no bias) and are only ever called, never inspected,
    so after ``lod.factorize`` the module runs unchanged at any active rank, 0 included (a rank-0
    projection outputs zeros: uniform attention, or a zero update).
    """

    def __init__(self, d_model: int, heads: int, dropout: float):
        super().__init__()
        if d_model % heads:
            raise ValueError(f"MultiHeadAttention: d_model must be divisible by heads, got d_model={d_model}, "
                             f"heads={heads}")
        self.heads, self.d_k = heads, d_model // heads
        self.wq = nn.Linear(d_model, d_model, bias=False)
        self.wk = nn.Linear(d_model, d_model, bias=False)
        self.wv = nn.Linear(d_model, d_model, bias=False)
        self.wo = nn.Linear(d_model, d_model, bias=False)
        self.attn_dropout = nn.Dropout(dropout)  # on the attention weights
        self.dropout = nn.Dropout(dropout)  # on the sub-layer output
        self.layer_norm = nn.LayerNorm(d_model, eps=1e-6)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """x (B, T, d) queries; memory (B, S, d) keys and values (x itself for self-attention);
        keep: bool, broadcastable to (B, heads, T, S), True where a query may attend to a key."""
        (B, T, d), S = x.shape, memory.shape[1]
        q = self.wq(x).reshape(B, T, self.heads, self.d_k).transpose(1, 2)  # (B, h, T, d_k)
        k = self.wk(memory).reshape(B, S, self.heads, self.d_k).transpose(1, 2)  # (B, h, S, d_k)
        v = self.wv(memory).reshape(B, S, self.heads, self.d_k).transpose(1, 2)  # (B, h, S, d_k)
        scores = (q / math.sqrt(self.d_k)) @ k.transpose(-2, -1)  # (B, h, T, S)
        # The most negative finite value, not -inf: a fully masked row (an all-padding sentence)
        # becomes uniform instead of NaN, and stays finite in half precision.
        scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
        attn = self.attn_dropout(scores.softmax(dim=-1))
        out = (attn @ v).transpose(1, 2).reshape(B, T, d)  # (B, T, d)
        return self.layer_norm(x + self.dropout(self.wo(out)))


@register_macs(MultiHeadAttention)
def _attention_macs(m: MultiHeadAttention, inputs, output) -> int:
    """Q K^T and A V: B x heads x T x S x d_k each (the projections are counted by their own hooks)."""
    x, memory = inputs[0], inputs[1]
    batch, queries, keys = x.shape[0], x.shape[1], memory.shape[1]
    return 2 * batch * queries * keys * m.heads * m.d_k


class FeedForward(nn.Module):
    """LayerNorm(x + Dropout(w2 ReLU(w1 x)))."""

    def __init__(self, d_model: int, ffn: int, dropout: float):
        super().__init__()
        self.w1 = nn.Linear(d_model, ffn)
        self.w2 = nn.Linear(ffn, d_model)
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(d_model, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer_norm(x + self.dropout(self.w2(F.relu(self.w1(x)))))  # (B, L, d)


class EncoderLayer(nn.Module):
    def __init__(self, d_model: int, heads: int, ffn: int, dropout: float):
        super().__init__()
        self.self_attn = MultiHeadAttention(d_model, heads, dropout)
        self.ffn = FeedForward(d_model, ffn, dropout)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        return self.ffn(self.self_attn(x, x, keep))


class DecoderLayer(nn.Module):
    def __init__(self, d_model: int, heads: int, ffn: int, dropout: float):
        super().__init__()
        self.self_attn = MultiHeadAttention(d_model, heads, dropout)
        self.cross_attn = MultiHeadAttention(d_model, heads, dropout)
        self.ffn = FeedForward(d_model, ffn, dropout)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, self_keep: torch.Tensor,
                memory_keep: torch.Tensor) -> torch.Tensor:
        x = self.self_attn(x, x, self_keep)
        return self.ffn(self.cross_attn(x, memory, memory_keep))


class Encoder(nn.Module):
    def __init__(self, d_model: int, heads: int, ffn: int, layers: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(d_model, eps=1e-6)
        self.layers = nn.ModuleList(EncoderLayer(d_model, heads, ffn, dropout) for _ in range(layers))

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """x (B, S, d): embedded source with positions; keep (B, 1, 1, S)."""
        x = self.layer_norm(self.dropout(x))
        for layer in self.layers:
            x = layer(x, keep)
        return x  # (B, S, d)


class Decoder(nn.Module):
    def __init__(self, d_model: int, heads: int, ffn: int, layers: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(d_model, eps=1e-6)
        self.layers = nn.ModuleList(DecoderLayer(d_model, heads, ffn, dropout) for _ in range(layers))

    def forward(self, x: torch.Tensor, memory: torch.Tensor, self_keep: torch.Tensor,
                memory_keep: torch.Tensor) -> torch.Tensor:
        """x (B, T, d): embedded target with positions; memory (B, S, d); self_keep (B, 1, T, T);
        memory_keep (B, 1, 1, S)."""
        x = self.layer_norm(self.dropout(x))
        for layer in self.layers:
            x = layer(x, memory, self_keep, memory_keep)
        return x  # (B, T, d)


class TiedProjection(nn.Module):
    """logits = h E^T / sqrt(d) with the embedding matrix E passed in: owns no parameter, so the
    tie survives ``lod.factorize`` and every tensor is counted once."""

    def __init__(self, d_model: int):
        super().__init__()
        self.scale = d_model ** -0.5

    def forward(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(h, weight) * self.scale  # (B, T, vocab)


@register_macs(TiedProjection)
def _projection_macs(m: TiedProjection, inputs, output) -> int:
    h = inputs[0]
    return (h.numel() // h.shape[-1]) * h.shape[-1] * output.shape[-1]


class Transformer(nn.Module):
    """forward(src (B, S), tgt_in (B, T) LongTensors, padding index 1) -> logits (B, T, vocab_size).

    Key padding masks on the source (encoder and cross attention) and target, and a causal mask
    on the decoder's self-attention: position t sees target tokens <= t only.
    """

    def __init__(self, vocab_size: int = 9521, d_model: int = 512, heads: int = 8, ffn: int = 2048,
                 layers: int = 6, dropout: float = 0.1, max_len: int = 256):
        super().__init__()
        if vocab_size <= PAD_INDEX:
            raise ValueError(f"Transformer: vocab_size must exceed the padding index {PAD_INDEX}, got {vocab_size}")
        self.vocab_size, self.d_model = vocab_size, d_model
        self.embedding = nn.Embedding(vocab_size, d_model, padding_idx=PAD_INDEX)  # source, target and output
        self.positional = PositionalEncoding(d_model, max_len)
        self.encoder = Encoder(d_model, heads, ffn, layers, dropout)
        self.decoder = Decoder(d_model, heads, ffn, layers, dropout)
        self.projection = TiedProjection(d_model)
        for p in self.parameters():  # the paper's code: Xavier-uniform on every matrix
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        with torch.no_grad():
            self.embedding.weight[PAD_INDEX].zero_()  # the padding token embeds to zero

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        if src.dim() != 2 or tgt_in.dim() != 2 or src.shape[0] != tgt_in.shape[0]:
            raise ValueError(f"Transformer: expected src (B, S) and tgt_in (B, T) token ids with one B, got "
                             f"{tuple(src.shape)} and {tuple(tgt_in.shape)}")
        T = tgt_in.shape[1]
        src_keep = (src != PAD_INDEX)[:, None, None, :]  # (B, 1, 1, S)
        causal = torch.ones(T, T, dtype=torch.bool, device=tgt_in.device).tril()  # (T, T)
        tgt_keep = (tgt_in != PAD_INDEX)[:, None, None, :] & causal  # (B, 1, T, T)
        memory = self.encoder(self.positional(self.embedding(src)), src_keep)  # (B, S, d)
        h = self.decoder(self.positional(self.embedding(tgt_in)), memory, tgt_keep, src_keep)  # (B, T, d)
        return self.projection(h, self.embedding.weight)  # (B, T, vocab)
