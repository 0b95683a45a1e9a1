"""Shared building blocks: attention, MLP, Transformer layer, masks, pooling, KV cache.

Every fusion module builds on these, so attention is written
once, on ``torch.nn.functional.scaled_dot_product_attention``, and so is the
key/value cache that caption generation uses.

Matrix products go through :class:`Linear` (:func:`linear`), an ``nn.Linear``
that stays fast under bf16 autocast on CPUs without optimised bf16 kernels (see
:func:`cpu_has_optimized_bf16_kernels`, e.g. AMD Zen 3 or other AVX2-only CPUs). There
PyTorch's bf16 matrix and attention kernels are a reference fallback, far
slower than its fp32 kernels, so :class:`Linear` and :class:`Attention` compute in fp32
instead; everywhere else (GPUs, CPUs with AVX-512, AVX512-BF16 or AMX) autocast applies as usual.

Mask convention everywhere in fusionzoo: boolean, ``True`` = a real token that
may be attended to, ``False`` = padding. Attention masks given to
:class:`Attention` are boolean ``(B, 1 or H, L_query, L_key)`` with the same
meaning (the convention of ``scaled_dot_product_attention``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel


# -- bf16 matrix products on CPUs without optimised bf16 kernels -----------------

_OPTIMIZED_BF16_KERNELS: bool | None = None


def cpu_has_optimized_bf16_kernels() -> bool:
    """Whether PyTorch multiplies bf16 matrices on this CPU with optimised kernels, not its reference fallback.

    True where oneDNN runs bf16 GEMMs: with bf16 instructions (AVX512-BF16 / AMX, Arm
    BF16) and also by emulating them with plain AVX-512; False on AVX2-only CPUs (e.g.
    AMD Zen 3, Intel before Skylake-X), where ``torch.mm`` on bf16 falls back to a
    reference kernel. This answers "is bf16 work safe to run here", which decides whether
    :class:`Linear` and :class:`Attention` step out of bf16 autocast into fp32. It is not
    :func:`fusionzoo.hardware.cpu_has_bf16_instructions`, which answers "is bf16 faster
    than fp32 here" for ``mixed_precision=auto``: an AVX-512 CPU without bf16
    instructions has optimised (emulated) kernels, but they do not beat fp32.
    Checked once per process.
    """
    global _OPTIMIZED_BF16_KERNELS
    if _OPTIMIZED_BF16_KERNELS is None:
        try:
            _OPTIMIZED_BF16_KERNELS = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):  # a PyTorch without the check: trust the ISA level
            _OPTIMIZED_BF16_KERNELS = torch.backends.cpu.get_cpu_capability() not in (
                "DEFAULT", "NO AVX", "AVX", "AVX2")
    return _OPTIMIZED_BF16_KERNELS


def _cpu_autocast_bf16() -> bool:
    if hasattr(torch, "get_autocast_dtype"):  # torch >= 2.4
        return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    return torch.is_autocast_cpu_enabled() and torch.get_autocast_cpu_dtype() == torch.bfloat16


def bf16_is_slow_here(x: Tensor) -> bool:
    """Whether bf16 work on ``x`` would hit PyTorch's slow CPU bf16 kernels.

    True for a CPU tensor under CPU bf16 autocast (or a bf16 CPU tensor) on a CPU
    where :func:`cpu_has_optimized_bf16_kernels` is False.
    """
    return (
        x.device.type == "cpu"
        and (x.dtype == torch.bfloat16 or _cpu_autocast_bf16())
        and not cpu_has_optimized_bf16_kernels()
    )


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear``, but in fp32 where bf16 would hit slow kernels (:func:`bf16_is_slow_here`).

    There, with fp32 parameters, the product is computed from ``x`` in fp32 and the
    result is fp32 (autocast would have made both bf16): on a CPU without bf16
    instructions the fp32 kernels are far faster than PyTorch's bf16 fallback, and
    converting activations back and forth would cost more than bf16 saves.
    """
    if weight.dtype == torch.float32 and bf16_is_slow_here(x):
        with torch.autocast("cpu", enabled=False):
            return F.linear(x.float(), weight, bias)
    rows = x.numel() // max(1, x.shape[-1]) if weight.shape[0] >= WIDE_OUTPUT else FEW_ROWS + 1
    if rows <= FEW_ROWS and x.device.type == "cpu":
        # A few rows through a very wide matrix (an LM head while decoding) is a pass over the
        # weight, which PyTorch's CPU kernels make faster as weight @ x^T than as F.linear's
        # x @ weight^T (the README's benchmark section has the gain).
        flat = x.reshape(rows, x.shape[-1])  # (R, Din)
        out = torch.mm(weight, flat.T) if bias is None else torch.addmm(bias[:, None], weight, flat.T)  # (Dout, R)
        return out.T.contiguous().view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


#: :func:`linear` takes the ``weight @ x^T`` path for at most this many rows ...
FEW_ROWS = 32
#: ... into at least this many outputs.
WIDE_OUTPUT = 4096


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same state dict) computed by :func:`linear`.

    Identical to ``nn.Linear`` except under CPU bf16 autocast on a CPU without bf16
    instructions, where it computes in fp32 (see :func:`linear`).
    """

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


class KVCache:
    """Keys and values of past positions, for incremental (token by token) decoding.

    One object serves a whole model for one ``generate`` call. Attention layers
    store their tensors under their own identity; fusion modules may keep other
    per-sample state (for example an image stream computed once) in
    :attr:`state`. ``offset`` counts the text positions already processed.
    """

    def __init__(self) -> None:
        self._kv: dict[int, tuple[Tensor, Tensor]] = {}  # static (cross-attention) keys/values
        self._grown: dict[int, tuple[Tensor, Tensor, int]] = {}  # self-attention: buffers, positions used
        self.state: dict[str, Tensor] = {}
        self.offset: int = 0

    def append(self, owner: nn.Module, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append new keys/values (B, H, L_new, Dh) of a self-attention; return all so far.

        The positions live in buffers with room to spare (doubled when full), so a
        decoding step writes its one new position instead of copying every past one
        (``torch.cat`` was the largest cost of cached decoding after the matmuls).
        """
        key, new = id(owner), k.shape[2]
        kbuf, vbuf, used = self._grown.get(key, (None, None, 0))
        if kbuf is None or used + new > kbuf.shape[2]:
            capacity = max(2 * (used + new), 16)
            grown_k = k.new_empty(*k.shape[:2], capacity, k.shape[3])
            grown_v = v.new_empty(*v.shape[:2], capacity, v.shape[3])
            if kbuf is not None:
                grown_k[:, :, :used], grown_v[:, :, :used] = kbuf[:, :, :used], vbuf[:, :, :used]
            kbuf, vbuf = grown_k, grown_v
        kbuf[:, :, used: used + new] = k
        vbuf[:, :, used: used + new] = v
        used += new
        self._grown[key] = (kbuf, vbuf, used)
        return kbuf[:, :, :used], vbuf[:, :, :used]

    def get_static(self, owner: nn.Module) -> tuple[Tensor, Tensor] | None:
        """Keys/values of a cross-attention computed at the first step, or None."""
        return self._kv.get(id(owner))

    def put_static(self, owner: nn.Module, k: Tensor, v: Tensor) -> None:
        self._kv[id(owner)] = (k, v)

    def reorder(self, index: Tensor) -> None:
        """Select batch rows (beam search): every cached tensor becomes ``t[index]``."""
        self._kv = {k: (a.index_select(0, index), b.index_select(0, index)) for k, (a, b) in self._kv.items()}
        # Whole buffers, spare room included: the next append writes in place instead of growing.
        self._grown = {k: (a.index_select(0, index), b.index_select(0, index), n)
                       for k, (a, b, n) in self._grown.items()}
        self.state = {k: t.index_select(0, index) for k, t in self.state.items()}

    def __len__(self) -> int:
        return len(self._kv) + len(self._grown)


class Attention(nn.Module):
    """Multi-head attention (self or cross) on ``scaled_dot_product_attention``.

    Args:
        dim: width of the queries and of the output.
        num_heads: number of heads; must divide ``dim``.
        context_dim: width of the keys/values source for cross-attention
            (defaults to ``dim``).
        dropout: attention-probability dropout (training only).
    """

    def __init__(self, dim: int, num_heads: int, context_dim: int | None = None, dropout: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by num_heads={num_heads}")
        context_dim = context_dim or dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = Linear(dim, dim)
        self.k = Linear(context_dim, dim)
        self.v = Linear(context_dim, dim)
        self.out = Linear(dim, dim)
        self.dropout = dropout

    def _heads(self, x: Tensor) -> Tensor:  # (B, L, D) -> (B, H, L, Dh)
        b, l, _ = x.shape
        return x.view(b, l, self.num_heads, self.head_dim).transpose(1, 2)

    def _project(self, x: Tensor, layers: tuple[nn.Linear, ...]) -> tuple[Tensor, ...]:
        """``layers`` applied to ``x`` (B, L, Din) as one product, each result split into heads (B, H, L, Dh).

        Layers that are not float Linears (INT8 ones, :mod:`fusionzoo.quantize`) run one by one.
        """
        if len(layers) == 1 or not all(isinstance(layer, nn.Linear) for layer in layers):
            return tuple(self._heads(layer(x)) for layer in layers)
        weight = torch.cat([layer.weight for layer in layers])  # (n * D, Din)
        bias = torch.cat([layer.bias for layer in layers])
        b, l, _ = x.shape
        y = linear(x, weight, bias).view(b, l, len(layers), self.num_heads, self.head_dim)
        return tuple(y.permute(2, 0, 3, 1, 4).unbind(0))  # n x (B, H, L, Dh)

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        attn_mask: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> Tensor:
        """
        Args:
            x: queries (B, L, D).
            context: keys/values source (B, S, Dc) for cross-attention; ``None``
                for self-attention over ``x``.
            attn_mask: boolean (B, 1|H, L, S_total), True = may attend. With a
                cache, ``S_total`` counts the cached positions too.
            cache: for incremental decoding. Self-attention appends this call's
                keys/values; cross-attention computes its keys/values once.
        Returns:
            (B, L, D)
        """
        b, l, d = x.shape
        if context is None:
            # One matrix product for q, k and v (the three weights concatenated): fewer, larger
            # GEMMs and one autocast cast instead of three; the parameters stay q/k/v.
            q, k, v = self._project(x, (self.q, self.k, self.v))
            if cache is not None:
                k, v = cache.append(self, k, v)
        else:
            q, = self._project(x, (self.q,))
            kv = cache.get_static(self) if cache is not None else None
            if kv is None:
                kv = self._project(context, (self.k, self.v))
                if cache is not None:
                    cache.put_static(self, *kv)
            k, v = kv
        if bf16_is_slow_here(q):  # like `linear`: fp32, not PyTorch's slow CPU bf16 attention
            with torch.autocast("cpu", enabled=False):
                y = F.scaled_dot_product_attention(
                    q.float(), k.float(), v.float(), attn_mask=attn_mask,
                    dropout_p=self.dropout if self.training else 0.0,
                )
        elif q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
            # PyTorch's CPU flash-attention kernel is slow in bf16 (its backward above all), so
            # half-precision attention on the CPU takes the math kernel; fp32 keeps the default
            # choice, where flash is the faster one (the README's benchmark section has figures).
            with sdpa_kernel(SDPBackend.MATH):
                y = F.scaled_dot_product_attention(
                    q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
                )
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
            )
        return self.out(y.transpose(1, 2).reshape(b, l, d))


class MLP(nn.Module):
    """Linear -> GELU -> dropout -> Linear."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int | None = None, dropout: float = 0.0):
        super().__init__()
        self.fc1 = Linear(in_dim, hidden_dim)
        self.fc2 = Linear(hidden_dim, out_dim or in_dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.drop(F.gelu(self.fc1(x))))


class TransformerLayer(nn.Module):
    """Pre-norm Transformer layer: self-attention, optional cross-attention, MLP.

    Args:
        dim: token width.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width as a multiple of ``dim``.
        context_dim: width of the cross-attention source; ``None`` means no
            cross-attention (an encoder layer).
        dropout: dropout on attention probabilities and residual branches.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        context_dim: int | None = None,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, num_heads, dropout=dropout)
        self.has_cross = context_dim is not None
        if self.has_cross:
            self.norm_cross = nn.LayerNorm(dim)
            self.cross_attn = Attention(dim, num_heads, context_dim=context_dim, dropout=dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio), dropout=dropout)
        self.drop = nn.Dropout(dropout)

    def forward(
        self,
        x: Tensor,
        self_mask: Tensor | None = None,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> Tensor:
        """x (B, L, D); masks boolean as in :class:`Attention`; returns (B, L, D)."""
        return self.forward_queries(x, None, self_mask, context, context_mask, cache)

    def forward_queries(
        self,
        x: Tensor,
        queries: slice | None,
        self_mask: Tensor | None = None,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> Tensor:
        """The layer's output at positions ``queries`` of ``x`` (B, L, D) only: (B, L_q, D).

        Every position is still a key and value of the self-attention; only the
        queries, the cross-attention and the MLP are limited to ``queries`` (None =
        all). A model that reads one position of its last layer (a [CLS] pooler)
        skips the rest of that layer's work this way. ``self_mask`` must have a
        query axis of 1 or of the selected positions.
        """
        if queries is None:
            x = x + self.drop(self.self_attn(self.norm1(x), attn_mask=self_mask, cache=cache))
        else:
            if cache is not None:
                raise ValueError("forward_queries with a query subset does not take a cache")
            h = self.norm1(x)  # (B, L, D)
            x = x[:, queries] + self.drop(self.self_attn(h[:, queries], context=h, attn_mask=self_mask))
        if self.has_cross:
            if context is None:
                raise ValueError("this layer has cross-attention but no context was given")
            x = x + self.drop(self.cross_attn(self.norm_cross(x), context, context_mask, cache=cache))
        return x + self.drop(self.mlp(self.norm2(x)))


# -- masks ---------------------------------------------------------------------


def key_mask(valid: Tensor | None) -> Tensor | None:
    """Key-padding mask (B, S) -> attention mask (B, 1, 1, S), broadcast over queries."""
    if valid is None:
        return None
    return valid[:, None, None, :].bool()


def causal_mask(valid: Tensor, num_queries: int | None = None, offset: int = 0) -> Tensor:
    """Causal mask over text keys, combined with key padding.

    Args:
        valid: (B, S) key validity for all positions so far (cached + new).
        num_queries: number of new query positions (defaults to S - offset).
        offset: index of the first query position among the keys.
    Returns:
        boolean (B, 1, L, S): query i (absolute position offset+i) may attend key j
        iff j <= offset+i and key j is valid.
    """
    s = valid.shape[1]
    l = s - offset if num_queries is None else num_queries
    q_pos = torch.arange(offset, offset + l, device=valid.device)[:, None]
    k_pos = torch.arange(s, device=valid.device)[None, :]
    allowed = k_pos <= q_pos  # (L, S)
    return allowed[None, None] & valid[:, None, None, :].bool()


def causal_self_mask(valid: Tensor, num_queries: int, offset: int) -> Tensor:
    """Causal text self-attention mask (B, 1, L, S) in which every query also sees itself.

    :func:`causal_mask` with each query's own key always allowed. Seeing itself changes
    nothing for a real token (its own key is valid), but a padded query's row is then
    never all False, which would give NaN.

    Args:
        valid: (B, S) key validity for all positions so far (cached + new).
        num_queries: number of new query positions L.
        offset: index of the first query position among the keys.
    """
    q_pos = torch.arange(offset, offset + num_queries, device=valid.device)[:, None]  # (L, 1)
    own = q_pos == torch.arange(valid.shape[1], device=valid.device)[None, :]  # (L, S)
    return causal_mask(valid, num_queries, offset) | own


def prefix_causal_mask(
    prefix_valid: Tensor,
    text_valid: Tensor,
    num_queries: int | None = None,
    offset: int = 0,
    prefix_queries: bool = True,
) -> Tensor:
    """Prefix-LM mask over keys ``[prefix (P); text (S)]`` (image prefix, causal text).

    Prefix (image) queries see the valid prefix keys only; the text query at
    absolute position p sees the valid prefix keys and the valid text keys j <= p.

    Args:
        prefix_valid: (B, P) validity of the prefix (image) keys.
        text_valid: (B, S) validity of all text positions so far (cached + new).
        num_queries: number of new text queries (defaults to S - offset).
        offset: absolute position of the first new text query.
        prefix_queries: whether the queries start with the P prefix positions
            (a first decoding step, or a full forward) or are text only.
    Returns:
        boolean (B, 1, (P if prefix_queries else 0) + L, P + S).
    """
    b, p = prefix_valid.shape
    s = text_valid.shape[1]
    q_len = s - offset if num_queries is None else num_queries
    prefix_keys = prefix_valid.bool()[:, None, None, :]  # (B, 1, 1, P)
    text_rows = torch.cat([prefix_keys.expand(b, 1, q_len, p), causal_mask(text_valid, q_len, offset)], dim=-1)
    if not prefix_queries:
        return text_rows  # (B, 1, L, P + S)
    no_text = torch.zeros(b, 1, p, s, dtype=torch.bool, device=prefix_valid.device)
    prefix_rows = torch.cat([prefix_keys.expand(b, 1, p, p), no_text], dim=-1)
    return torch.cat([prefix_rows, text_rows], dim=2)  # (B, 1, P + L, P + S)


def all_valid(x: Tensor) -> Tensor:
    """A (B, L) mask of True for a (B, L, D) tensor with no padding."""
    return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)


# -- pooling -------------------------------------------------------------------


def masked_mean(x: Tensor, mask: Tensor | None) -> Tensor:
    """Mean over dim 1 of (B, L, D) counting only positions where ``mask`` (B, L) is True."""
    if mask is None:
        return x.mean(dim=1)
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


def causal_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Running mean over valid positions: out[:, t] = mean of valid x[:, :t+1]. (B, L, D)."""
    m = mask.to(x.dtype).unsqueeze(-1)
    return torch.cumsum(x * m, dim=1) / torch.cumsum(m, dim=1).clamp_min(1.0)


def running_masked_mean(x: Tensor, mask: Tensor, cache: KVCache | None, key: str) -> Tensor:
    """``masked_mean`` over every position seen so far, for incremental decoding.

    Without a cache this is ``masked_mean(x, mask)``. With one, ``x`` (B, L, D) and
    ``mask`` (B, L) cover only the new positions; the sum of valid rows and their
    count are kept in ``cache.state[key + ".sum"]`` / ``[key + ".count"]``, so
    calling step by step returns the mean over all valid positions so far. (B, D).
    """
    if cache is None:
        return masked_mean(x, mask)
    m = mask.to(x.dtype).unsqueeze(-1)  # (B, L, 1)
    total, count = (x * m).sum(dim=1), m.sum(dim=1)  # (B, D), (B, 1)
    if key + ".sum" in cache.state:
        total = total + cache.state[key + ".sum"]
        count = count + cache.state[key + ".count"]
    cache.state[key + ".sum"], cache.state[key + ".count"] = total, count
    return total / count.clamp_min(1.0)


class AttentionPool(nn.Module):
    """Pool (B, L, D) to (B, D) with one learned query (masked softmax over positions)."""

    def __init__(self, dim: int):
        super().__init__()
        self.score = Linear(dim, 1)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        s = self.score(x).squeeze(-1)  # (B, L)
        if mask is not None:
            s = s.masked_fill(~mask.bool(), torch.finfo(s.dtype).min)
        w = s.softmax(dim=-1).unsqueeze(-1)
        return (w * x).sum(dim=1)


def sinusoidal_positions(length: int, dim: int) -> Tensor:
    """Fixed sine/cosine position table (length, dim) of "Attention Is All You Need"."""
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(pos * div)
    table[:, 1::2] = torch.cos(pos * div[: dim // 2])
    return table


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """Initialise a fusion or head: fan-in scaled linear layers, unit LayerNorm, N(0, std) embedding tables.

    Linear layers keep PyTorch's default (uniform in +-1/sqrt(fan_in), :meth:`nn.Linear.reset_parameters`)
    rather than BERT's fixed N(0, 0.02): the fusions sit on frozen encoder features
    1,280 or 384 channels wide and mostly stack MLPs without residual paths, where the
    fixed 0.02 shrinks the signal layer by layer. On the easy-VQA benchmark (frozen
    encoders; ``early_concat`` without its Transformer layer, no dropout, batch 64, one
    epoch) the fixed init reached 85.9% test accuracy (44% on colour questions) against
    92.8% (93%) with this one.
    """
    for m in module.modules():
        if isinstance(m, nn.Linear):
            m.reset_parameters()
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.trunc_normal_(m.weight, std=std)
