"""Attention ops: ONNX Attention (opset 23) and RotaryEmbedding (opset 23), and the com.microsoft ops that
onnxruntime-genai and onnxruntime's transformer optimizer write (GroupQueryAttention, RotaryEmbedding,
MultiHeadAttention), as onnxruntime's CPU kernels compute them. Heads are [batch, heads, seq, head_size] inside.
"""

from __future__ import annotations

import math

import torch

from onnxprune.errors import UnsupportedOpError
from onnxprune.train.ops import register


def _heads(x, n):
    """[B, S, n*H] -> [B, n, S, H] (4-D inputs are already so)."""
    if x.dim() == 4:
        return x
    b, s, d = x.shape
    return x.reshape(b, s, n, d // n).transpose(1, 2)


def _merge(x):
    b, n, s, h = x.shape
    return x.transpose(1, 2).reshape(b, s, n * h)


def _repeat_kv(k, groups):
    return k if groups == 1 else k.repeat_interleave(groups, dim=1)


def _attend(q, k, v, scale, bias=None, softcap=0.0):
    """softmax(q k^T * scale + bias) v, key/value heads repeated for grouped-query attention."""
    groups = q.shape[1] // k.shape[1]
    k, v = _repeat_kv(k, groups), _repeat_kv(v, groups)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if softcap and softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    if bias is not None:
        scores = scores + bias
    return torch.matmul(torch.softmax(scores, -1), v)


def _neg_inf(dtype):
    return torch.finfo(dtype).min


def _check_attention(node):
    if node.n_outputs > 3:
        return "the qk_matmul_output output is not implemented"
    if node.get("softmax_precision") not in (None, 0, 1):
        return "softmax_precision other than float is not implemented"
    return None


@register("Attention", check=_check_attention)
def attention(node, q, k, v, mask=None, past_key=None, past_value=None, nonpad_kv_seqlen=None):
    three_d = q.dim() == 3
    qh, kvh = node.get("q_num_heads"), node.get("kv_num_heads")
    q, k, v = _heads(q, qh), _heads(k, kvh), _heads(v, kvh)
    if past_key is not None:
        k = torch.cat([past_key, k], 2)
        v = torch.cat([past_value, v], 2)
    present_k, present_v = k, v
    scale = node.get("scale") or 1 / math.sqrt(q.shape[-1])
    s, total = q.shape[2], k.shape[2]
    bias = None
    if mask is not None:
        bias = torch.where(mask, 0.0, _neg_inf(q.dtype)).to(q.dtype) if mask.dtype == torch.bool else mask
    if node.get("is_causal", 0):
        # onnxruntime aligns the causal mask at the bottom right: with a past of P keys, query i sees keys 0..P+i
        allowed = torch.ones(s, total, dtype=torch.bool, device=q.device).tril(total - s)
        causal = torch.where(allowed, 0.0, _neg_inf(q.dtype)).to(q.dtype)
        bias = causal if bias is None else bias + causal
    y = _attend(q, k, v, scale, bias, node.get("softcap", 0.0))
    y = _merge(y) if three_d else y
    return (y, present_k, present_v)[:node.n_outputs] if node.n_outputs > 1 else y


def _rotate(x, cos, sin, interleaved: bool):
    """x [..., S, rd] rotated by cos/sin [..., S, rd/2] (half-split or interleaved pairs)."""
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        r1, r2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
        return torch.stack([r1, r2], -1).flatten(-2)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def _rotary(x, cos, sin, interleaved: bool, rotary_dim: int):
    """x [B, N, S, H]; cos/sin [B, S, rd/2] (broadcast over heads)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    if rotary_dim >= x.shape[-1]:
        return _rotate(x, cos, sin, interleaved)
    return torch.cat([_rotate(x[..., :rotary_dim], cos, sin, interleaved), x[..., rotary_dim:]], -1)


def _positions(position_ids, b, s, device):
    if position_ids.numel() == 1:  # an offset: the positions run on from it
        return (position_ids.reshape(1, 1) + torch.arange(s, device=device).reshape(1, s)).expand(b, s)
    return position_ids.expand(b, s)


@register("RotaryEmbedding", domain="com.microsoft", static=(1,),
          check=lambda n: "is_packed_batching=1 is not implemented" if n.get("is_packed_batching", 0) else None)
def rotary_embedding_ms(node, x, position_ids, cos_cache, sin_cache):
    return _rotary_embedding(node, x, cos_cache, sin_cache, position_ids, ms=True)


@register("RotaryEmbedding", static=(3,))
def rotary_embedding(node, x, cos_cache, sin_cache, position_ids=None):
    return _rotary_embedding(node, x, cos_cache, sin_cache, position_ids, ms=False)


def _rotary_embedding(node, x, cos_cache, sin_cache, position_ids, ms: bool):
    interleaved = bool(node.get("interleaved", 0))
    three_d = x.dim() == 3
    if three_d:
        b, s, hidden = x.shape
        heads = node.get("num_heads", 0) or hidden // (2 * cos_cache.shape[-1])
        x4 = x.reshape(b, s, heads, hidden // heads).transpose(1, 2)
    else:
        x4 = x
        b, s = x4.shape[0], x4.shape[2]
    rotary_dim = node.get("rotary_embedding_dim", 0) or 2 * cos_cache.shape[-1]
    if position_ids is not None:
        pos = _positions(position_ids.to(torch.int64), b, s, x.device)
        cos, sin = cos_cache[pos], sin_cache[pos]
    else:  # ONNX opset 23 without position ids: the caches are already [B, S, rd/2]
        cos, sin = cos_cache, sin_cache
    y = _rotary(x4, cos[..., :rotary_dim // 2], sin[..., :rotary_dim // 2], interleaved, rotary_dim)
    return y.transpose(1, 2).reshape(x.shape) if three_d else y


def _check_gqa(node):
    if node.get("smooth_softmax", 0):
        return "smooth_softmax=1 is not implemented"
    if node.get("qk_output", 0):
        return "qk_output is not implemented"
    return None


@register("GroupQueryAttention", domain="com.microsoft", static=(5, 6, 9), check=_check_gqa)
def group_query_attention(node, query, key=None, value=None, past_key=None, past_value=None, seqlens_k=None,
                          total_len=None, cos_cache=None, sin_cache=None, position_ids=None, attention_bias=None,
                          head_sink=None):
    if head_sink is not None:
        raise UnsupportedOpError("the training bridge does not run GroupQueryAttention head_sink")
    qh, kvh = node.get("num_heads"), node.get("kv_num_heads")
    b, s, _ = query.shape
    if key is None:  # packed q|k|v
        head = query.shape[-1] // (qh + 2 * kvh)
        query, key, value = torch.split(query, [qh * head, kvh * head, kvh * head], -1)
    q, k, v = _heads(query, qh), _heads(key, kvh), _heads(value, kvh)
    head = q.shape[-1]
    seqlens = seqlens_k.to(torch.int64).reshape(-1)
    total = int(total_len.reshape(-1)[0])
    past_len = 0 if past_key is None else past_key.shape[2]
    # the position of each new token: the valid length so far minus the new ones (a right-padded prompt starts at 0)
    first_prompt = past_len == 0 and s == total and s > 1
    start = torch.zeros_like(seqlens) if first_prompt else seqlens + 1 - s
    if node.get("do_rotary", 0):
        if position_ids is not None:
            pos = position_ids.to(torch.int64).expand(b, s)
        else:
            pos = start.reshape(b, 1) + torch.arange(s, device=q.device).reshape(1, s)
        interleaved = bool(node.get("rotary_interleaved", 0))
        rotary_dim = 2 * cos_cache.shape[-1]
        cos, sin = cos_cache[pos], sin_cache[pos]
        q = _rotary(q, cos, sin, interleaved, rotary_dim)
        k = _rotary(k, cos, sin, interleaved, rotary_dim)
    if past_key is not None:
        # onnxruntime keeps the cache right-padded: row b holds its start_b valid past entries, then the new ones,
        # then zeros (a left-padded mask shortens the valid past)
        length = max(past_len + s, total)
        j = torch.arange(length, device=q.device).reshape(1, length)
        st = start.reshape(b, 1)
        index = torch.where(j < st, j, torch.where(j < st + s, past_len + j - st, past_len + s))
        index = index.reshape(b, 1, length, 1).expand(b, k.shape[1], length, head)
        zero = torch.zeros_like(k[:, :, :1])
        k = torch.gather(torch.cat([past_key, k, zero], 2), 2, index)
        v = torch.gather(torch.cat([past_value, v, torch.zeros_like(v[:, :, :1])], 2), 2,
                         index[..., :1].expand(b, v.shape[1], length, v.shape[-1]))
    present_k, present_v = k, v
    kv_len = k.shape[2]
    keys = torch.arange(kv_len, device=q.device).reshape(1, 1, kv_len)
    queries = start.reshape(b, 1, 1) + torch.arange(s, device=q.device).reshape(1, s, 1)
    allowed = (keys <= queries) & (keys <= seqlens.reshape(b, 1, 1))
    window = node.get("local_window_size", -1)
    if window is not None and window > 0:
        allowed &= keys > queries - window
    bias = torch.where(allowed, 0.0, _neg_inf(q.dtype)).to(q.dtype).unsqueeze(1)
    if attention_bias is not None:
        bias = bias + attention_bias
    scale = node.get("scale") or 1 / math.sqrt(head)
    y = _merge(_attend(q, k, v, scale, bias, node.get("softcap", 0.0)))
    return (y, present_k, present_v)[:node.n_outputs] if node.n_outputs > 1 else y


def _check_mha(node):
    if node.n_outputs > 3:
        return "outputs past present_value are not implemented"
    return None


@register("MultiHeadAttention", domain="com.microsoft", static=(4, 8, 9), check=_check_mha)
def multi_head_attention(node, query, key=None, value=None, bias=None, key_padding_mask=None, attention_bias=None,
                         past_key=None, past_value=None, past_sequence_length=None, cache_indirection=None):
    if cache_indirection is not None:
        raise UnsupportedOpError("the training bridge does not run MultiHeadAttention cache_indirection")
    n = node.get("num_heads")
    if key is None:
        raise UnsupportedOpError("the training bridge does not run MultiHeadAttention with packed q|k|v")
    d = query.shape[-1]
    if bias is not None:
        query = query + bias[:d]
        if key.dim() == 3:
            key = key + bias[d:2 * d]
            value = value + bias[2 * d:]
    q = _heads(query, n)
    k, v = _heads(key, n), _heads(value, n)
    if past_key is not None and key.dim() == 3:
        k = torch.cat([past_key, k], 2)
        v = torch.cat([past_value, v], 2)
    present_k, present_v = k, v
    s, total = q.shape[2], k.shape[2]
    filler = node.get("mask_filter_value", -10000.0)
    scores_bias = None
    if key_padding_mask is not None:
        keep = key_padding_mask.reshape(key_padding_mask.shape[0], 1, 1, -1) != 0
        scores_bias = torch.where(keep, 0.0, filler).to(q.dtype)
    if attention_bias is not None:
        scores_bias = attention_bias if scores_bias is None else scores_bias + attention_bias
    if node.get("unidirectional", 0):
        allowed = torch.ones(s, total, dtype=torch.bool, device=q.device).tril(total - s)
        causal = torch.where(allowed, 0.0, _neg_inf(q.dtype)).to(q.dtype)
        scores_bias = causal if scores_bias is None else scores_bias + causal
    scale = node.get("scale") or 1 / math.sqrt(q.shape[-1])
    y = _merge(_attend(q, k, v, scale, scores_bias))
    return (y, present_k, present_v)[:node.n_outputs] if node.n_outputs > 1 else y
