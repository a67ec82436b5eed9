"""Models: SimpleNN (the seed's MNIST MLP) and a GPT (nanoGPT style) over bytes or BPE tokens.

`build_model(cfg, seed)` gives the same initial weights for the same seed on every node, without
touching the process-wide RNG (other code may rely on it).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from smolcluster.core.training.config import ModelConfig

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


class SimpleNN(nn.Module):
    """input_dim -> hidden -> out. 784-128-10 has 101,770 parameters."""

    def __init__(self, input_dim: int = 784, hidden: int = 128, out: int = 10, activation: str = "relu"):
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; use one of {sorted(_ACTIVATIONS)}")
        self.fc1 = nn.Linear(input_dim, hidden)
        self.act = _ACTIVATIONS[activation]()
        self.fc2 = nn.Linear(hidden, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # accepts [B, 784] or images [B, 1, 28, 28] / [B, 28, 28]
        return self.fc2(self.act(self.fc1(x.flatten(1))))


# --------------------------------------------------------------------------- GPT


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float):
        super().__init__()
        assert n_embd % n_head == 0, "n_embd must be divisible by n_head"
        self.n_head = n_head
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)
        self.dropout = dropout
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_drop(self.proj(y))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float, ff_dim: int | None = None):
        super().__init__()
        ff_dim = ff_dim or 4 * n_embd
        self.ln1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout)
        self.ln2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(nn.Linear(n_embd, ff_dim), nn.GELU(), nn.Linear(ff_dim, n_embd), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Decoder-only transformer over tokens (bytes, or BPE ids). forward(idx [B,T] int64) -> logits [B,T,vocab].

    No weight tying: every parameter has exactly one name, which keeps the parameter
    server's name-keyed pushes and the wire schema simple.
    """

    def __init__(self, vocab_size: int = 256, block_size: int = 64, n_layer: int = 2, n_head: int = 2,
                 n_embd: int = 64, dropout: float = 0.0, ff_dim: int | None = None):
        super().__init__()
        self.block_size = block_size
        self.tok_emb = nn.Embedding(vocab_size, n_embd)
        self.pos_emb = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout, ff_dim) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, vocab_size, bias=False)
        self.apply(self._init_weights)
        # GPT-2: scale residual projections by depth so the residual stream does not grow with n_layer
        for name, p in self.named_parameters():
            if name.endswith("attn.proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def features(self, idx: torch.Tensor) -> torch.Tensor:
        """The last hidden states [B,T,C] (what the output layer turns into logits)."""
        B, T = idx.shape
        if T > self.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(idx))

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        for _ in range(max_new_tokens):
            logits = self(idx[:, -self.block_size:])[:, -1, :] / temperature
            nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
            idx = torch.cat([idx, nxt], dim=1)
        return idx


# --------------------------------------------------------------------------- factory and loss


def build_model(cfg: ModelConfig, seed: int) -> nn.Module:
    """Same cfg + seed -> same initial weights, on any node. Leaves the global RNG as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if cfg.type == "SimpleNN":
            return SimpleNN(cfg.input_dim, cfg.hidden, cfg.out, cfg.activation)
        if cfg.type == "GPT":
            return GPT(cfg.vocab_size, cfg.block_size, cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.dropout, cfg.ff_dim)
    raise ValueError(f"unknown model type {cfg.type!r}; use SimpleNN or GPT")


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# Logits past this many elements (64 MB of float32) are computed a chunk of tokens at a time: with GPT-2's
# 50,257 tokens a batch of 32 x 128 has 823 MB of them, and the loss's softmax and gradient as much again.
LOGITS_CHUNK_ELEMENTS = 1 << 24


def _token_chunks(n_tokens: int, vocab: int) -> int:
    return max(1, LOGITS_CHUNK_ELEMENTS // max(1, vocab)) if n_tokens * vocab > LOGITS_CHUNK_ELEMENTS else n_tokens


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """mean(cross_entropy(h @ weight.T, y)) a chunk of tokens at a time, with the gradients of h and weight
    computed on the way (softmax - one-hot, as autograd would): no chunk's logits outlive it, and nothing
    is computed twice."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, chunk: int) -> torch.Tensor:
        n = h.shape[0]
        grad_h, grad_w = torch.empty_like(h), torch.zeros_like(weight)
        total = torch.zeros((), dtype=torch.float64, device=h.device)
        for i in range(0, n, chunk):
            hc, yc = h[i:i + chunk], y[i:i + chunk]
            logits = hc @ weight.t()
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, yc[:, None]).squeeze(1)).sum(dtype=torch.float64)
            probs = logits.sub_(lse[:, None]).exp_()  # softmax, in the logits' memory
            probs[torch.arange(len(yc), device=h.device), yc] -= 1.0
            probs /= n
            grad_h[i:i + chunk] = probs @ weight
            grad_w.addmm_(probs.t(), hc)
        ctx.save_for_backward(grad_h, grad_w)
        return (total / n).to(h.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out, grad_w * grad_out, None, None


def gpt_loss(model: GPT, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy. Big logits (GPT-2's vocabulary) go a chunk of tokens at a time, so a
    node holds one chunk's logits instead of the batch's: the default GPT config's peak memory halves."""
    h = model.features(x).reshape(-1, model.head.in_features)
    y = y.reshape(-1)
    chunk = _token_chunks(h.shape[0], model.head.out_features)
    if chunk >= h.shape[0]:
        return F.cross_entropy(model.head(h), y)
    return _ChunkedLinearCrossEntropy.apply(h, model.head.weight, y, chunk)


@torch.no_grad()
def gpt_eval_sums(model: GPT, x: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
    """(summed next-token cross-entropy, correct next-token guesses) over a batch, a chunk of logits at a time."""
    h = model.features(x).reshape(-1, model.head.in_features)
    y = y.reshape(-1)
    chunk = _token_chunks(h.shape[0], model.head.out_features)
    total, correct = 0.0, 0
    for i in range(0, h.shape[0], chunk):
        logits = model.head(h[i:i + chunk])
        total += float(F.cross_entropy(logits, y[i:i + chunk], reduction="sum"))
        correct += int((logits.argmax(-1) == y[i:i + chunk]).sum())
    return total, correct


def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy: classes for SimpleNN, next token for GPT (logits [B,T,V], y [B,T]).
    The batch moves to the model's device (a no-op on the CPU)."""
    device = model_device(model)
    x, y = x.to(device), y.to(device)
    if isinstance(model, GPT):
        return gpt_loss(model, x, y)
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
