"""A llama-architecture decoder: the network behind ``model=llama_char``.

Token embedding → ``n_layer`` × [RMSNorm → causal self-attention with rotary position embeddings
(grouped-query when ``n_head_kv < n_head``) → residual, RMSNorm → SwiGLU MLP → residual] →
RMSNorm → output projection. No biases anywhere; the output weights are not tied to the
embedding. Parameter names follow llama.cpp's tensor names one to one, so that an exporter maps
them without guessing::

    tok_embeddings.weight                 token_embd.weight
    layers.{i}.attention_norm.weight      blk.{i}.attn_norm.weight
    layers.{i}.attention.wq/wk/wv/wo      blk.{i}.attn_q/attn_k/attn_v/attn_output
    layers.{i}.ffn_norm.weight            blk.{i}.ffn_norm.weight
    layers.{i}.feed_forward.w1/w3/w2      blk.{i}.ffn_gate/ffn_up/ffn_down
    norm.weight                           output_norm.weight
    output.weight                         output.weight

RoPE uses the Hugging Face "rotate_half" convention: dimension ``i`` of a head is rotated with
dimension ``i + head_dim/2``. llama.cpp's llama graph rotates adjacent pairs ``(2i, 2i+1)``
instead, so an exporter must permute the rows of ``wq`` and ``wk`` per head exactly as
``convert_hf_to_gguf.py``'s ``LlamaModel.permute`` does (``reshape(n_head, 2, head_dim/2, n_embd)
.swapaxes(1, 2)``, with ``n_head_kv`` heads for ``wk``); ``wv``, ``wo`` and the rest need none.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ml_engine.errors import UserError
from ml_engine.training.registry import CAUSAL_LM, register_network


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    n_layer: int = 2
    n_head: int = 4
    n_head_kv: int = 4
    n_embd: int = 256
    n_ff: int = 768
    block_size: int = 64  # the context length it is trained on (and generate() keeps)
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head or (self.n_embd // self.n_head) % 2:
            raise UserError(
                f"model.net.n_embd={self.n_embd} must split into model.net.n_head={self.n_head} "
                "heads of even size"
            )
        if self.n_head_kv < 1 or self.n_head % self.n_head_kv:
            raise UserError(
                f"model.net.n_head={self.n_head} must be a multiple of "
                f"model.net.n_head_kv={self.n_head_kv}"
            )

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


class RMSNorm(nn.Module):
    """``x * rsqrt(mean(x²) + eps) * weight``, computed in float32 whatever the input dtype."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).type_as(x)


def rope_tables(length: int, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos and sin {length, head_dim} for rotate_half RoPE (each frequency twice, in halves)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate {B, H, T, D}: pairs (i, i + D/2), as Hugging Face's ``rotate_half``."""
    # in x's dtype: float32 tables would promote bf16 q and k to float32 under autocast, and
    # the casts back cost 5 % of a CPU training step (docs/language-model.md, the recipe)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin


def causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal softmax attention of {B, H, T, D} queries, keys and values.

    On the CPU written out (scores, mask, float32 softmax, weighted sum): PyTorch's CPU flash
    kernel spends about 11× its forward time in the backward pass, and this form made a whole
    training step of ``experiment=shakespeare_char`` 1.18× faster (1.26× with the RoPE tables in
    bf16; docs/language-model.md, "How the recipe was chosen"). Elsewhere the fused kernel.
    """
    if q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    length = q.shape[-2]
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
    future = torch.ones(length, length, dtype=torch.bool, device=q.device).triu(1)
    weights = scores.float().masked_fill(future, float("-inf")).softmax(dim=-1)
    return weights.to(v.dtype) @ v


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.n_head, self.n_head_kv = config.n_head, config.n_head_kv
        self.head_dim = config.head_dim
        kv_dim = config.n_head_kv * config.head_dim
        self.wq = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.wk = nn.Linear(config.n_embd, kv_dim, bias=False)
        self.wv = nn.Linear(config.n_embd, kv_dim, bias=False)
        self.wo = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        batch, length, width = x.shape
        q = self.wq(x).view(batch, length, self.n_head, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(batch, length, self.n_head_kv, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(batch, length, self.n_head_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.n_head_kv != self.n_head:  # query head h reads kv head h // group, as llama.cpp
            group = self.n_head // self.n_head_kv
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        out = causal_attention(q, k, v)
        return self.wo(out.transpose(1, 2).reshape(batch, length, width))


class FeedForward(nn.Module):
    """SwiGLU: ``w2(silu(w1 x) * w3 x)`` (w1 gate, w3 up, w2 down)."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(config.n_embd, config.n_ff, bias=False)
        self.w3 = nn.Linear(config.n_embd, config.n_ff, bias=False)
        self.w2 = nn.Linear(config.n_ff, config.n_embd, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.feed_forward = FeedForward(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin)
        return x + self.feed_forward(self.ffn_norm(x))


@register_network("llama", kind=CAUSAL_LM)
class Llama(nn.Module):
    """Decoder-only llama; ``forward`` maps ids {B, T} to next-token logits {B, T, vocab}."""

    def __init__(
        self,
        vocab_size: int,
        n_layer: int = 2,
        n_head: int = 4,
        n_head_kv: int = 4,
        n_embd: int = 256,
        n_ff: int = 768,
        block_size: int = 64,
        norm_eps: float = 1e-5,
        rope_theta: float = 10000.0,
    ) -> None:
        super().__init__()
        self.config = config = LlamaConfig(
            vocab_size, n_layer, n_head, n_head_kv, n_embd, n_ff, block_size, norm_eps, rope_theta
        )
        self.tok_embeddings = nn.Embedding(vocab_size, n_embd)
        self.layers = nn.ModuleList(Block(config) for _ in range(n_layer))
        self.norm = RMSNorm(n_embd, norm_eps)
        self.output = nn.Linear(n_embd, vocab_size, bias=False)
        cos, sin = rope_tables(block_size, config.head_dim, rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)  # not in the state dict
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # GPT-2's scaled init of the projections that add into the residual stream
        for name, parameter in self.named_parameters():
            if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
                nn.init.normal_(parameter, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def _rope(self, length: int, device: torch.device) -> tuple[Tensor, Tensor]:
        if length > self.rope_cos.shape[0]:  # longer than trained: computed for this call
            cos, sin = rope_tables(length, self.config.head_dim, self.config.rope_theta)
            return cos.to(device), sin.to(device)
        return self.rope_cos[:length], self.rope_sin[:length]

    def forward(self, idx: Tensor) -> Tensor:
        cos, sin = self._rope(idx.shape[1], idx.device)
        x = self.tok_embeddings(idx)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.output(self.norm(x))

    @torch.no_grad()
    def generate(
        self,
        idx: Tensor,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Append ``max_new_tokens`` to ``idx`` {B, T}, each from the last ``block_size`` tokens;
        ``temperature=0`` is greedy (argmax), otherwise sampling, optionally from the top k."""
        for _ in range(max_new_tokens):
            logits = self(idx[:, -self.config.block_size :])[:, -1, :]
            if temperature <= 0:
                next_id = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, [-1]]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = torch.softmax(logits, dim=-1)
                next_id = torch.multinomial(probs, 1, generator=generator)
            idx = torch.cat([idx, next_id], dim=1)
        return idx
