"""TEST STAND-IN for the compiled ``sgl_kernel`` CPU ops -- not a serving path.

SGLang 0.5.23's CPU engine (``SGLANG_USE_CPU_ENGINE=1``) calls ``torch.ops.sgl_kernel.*_cpu`` ops from the CPU build
of sgl-kernel, which is not on PyPI (the PyPI wheel is CUDA-only). ``sgl_kernel/__init__.py`` falls back to a plain
``import common_ops``, so this module, placed on ``PYTHONPATH`` by :mod:`sglang_ext.testing.sglang_cpu.launcher`,
becomes the kernel library: it registers the ops with ``torch.library.Library("sgl_kernel", "DEF")`` and implements
them in plain PyTorch (CPU dispatch key), following the semantics of SGLang's own Triton reference kernels
(``sglang/kernels/ops/speculative/``, ``sglang/srt/mem_cache/allocation.py``) and of its torch-native attention.

What it is for: running SGLang's real control flow (scheduler, radix cache, NGRAM / EAGLE workers, tree build and
greedy verify) end to end on a CPU-only machine, so that tests of this project can exercise the real server.
What it is not: a kernel library anyone should serve with. It is slow, it uses no AMX, and numbers measured with it
must be reported as "SGLang control flow with PyTorch stand-in kernels", never as SGLang CPU performance.

Attention is computed in float32 from the KV cache; in a float32 server it is exact up to float rounding, which
is what the token-identity tests (plain greedy == speculative greedy) rely on.

Ops that SGLang modules only *reference* at import time (MoE, hybrid and multimodal models) are bound as stubs
that raise ``NotImplementedError`` naming themselves, so imports stay clean and any real use fails loudly.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import re
import time
from typing import Callable, Optional

import torch

# ----------------------------------------------------------------------------------------------------------------
# Registration helpers
# ----------------------------------------------------------------------------------------------------------------

_LIB: Optional[torch.library.Library] = None  # module global: the registrations live as long as this object
_STUBS: dict[str, "_NotImplementedOp"] = {}


def _already_registered() -> bool:
    """True when another copy of this module (or a real build) already defined the ops in this process."""
    try:
        getattr(torch.ops.sgl_kernel, "decode_attention_cpu")
        return True
    except (AttributeError, RuntimeError):
        return False


# ----------------------------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------------------------


def _dequant(x: torch.Tensor, scale: float) -> torch.Tensor:
    """KV rows as float32; the scale applies only to 1-byte (fp8) caches, as ``key_scale`` does in the C++ op."""
    if x.element_size() == 1:
        return x.to(torch.float32) * scale
    return x.to(torch.float32)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: Optional[torch.Tensor], sm_scale: float,
            logit_cap: float, sinks: Optional[torch.Tensor]) -> torch.Tensor:
    """Softmax attention with grouped KV heads, all in float32.

    ``q``: [..., Hkv, G, Tq, D]; ``k``: [..., Hkv, Tk, D]; ``v``: [..., Hkv, Tk, Dv]; ``allowed`` broadcasts to
    [..., Hkv, G, Tq, Tk] (True = may attend). ``logit_cap > 0`` applies ``cap * tanh(s / cap)`` after scaling (as
    SGLang's Triton kernels do); ``sinks`` ([H] logits) join each row's softmax denominator and are then dropped.
    Returns [..., Hkv, G, Tq, Dv].
    """
    scores = torch.matmul(q, k.unsqueeze(-3).transpose(-1, -2)) * sm_scale
    if logit_cap > 0:
        scores = logit_cap * torch.tanh(scores / logit_cap)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    if sinks is not None:
        hkv, g = q.shape[-4], q.shape[-3]
        sink = sinks.to(torch.float32).view(hkv, g, 1, 1).expand(*scores.shape[:-1], 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, v.unsqueeze(-3))


def _check_not_cross(op: str, is_cross_attn: bool, encoder_lens: Optional[torch.Tensor]) -> None:
    if is_cross_attn or encoder_lens is not None:
        raise NotImplementedError(f"sgl_kernel stand-in {op}: cross attention / encoder_lens is not implemented")


def _window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int) -> torch.Tensor:
    """True where key ``k_pos`` lies in the last ``window`` positions up to ``q_pos`` (``window`` counts the query)."""
    return k_pos.unsqueeze(-2) > (q_pos.unsqueeze(-1) - window)


def decode_attention_cpu(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, key_scale: float,
                         value_scale: float, output: torch.Tensor, key: Optional[torch.Tensor],
                         value: Optional[torch.Tensor], loc: torch.Tensor, attn_logits: torch.Tensor,
                         req_to_token: torch.Tensor, req_pool_indices: torch.Tensor, seq_lens: torch.Tensor,
                         sm_scale: float, logit_cap: float, is_cross_attn: bool, sliding_window_size: int,
                         encoder_lens: Optional[torch.Tensor], sinks: Optional[torch.Tensor]) -> None:
    """One query token per sequence over its whole cached context.

    If ``key``/``value`` are given they are first written into ``k_cache``/``v_cache`` at ``loc`` (the intel_amx
    backend leaves the decode KV write to this op). Sequence ``i`` then attends to the cache rows
    ``req_to_token[req_pool_indices[i], :seq_lens[i]]``; ``sliding_window_size > 0`` keeps only the last that
    many. The result goes to ``output`` [B, H, Dv]. ``attn_logits`` is the C++ kernel's split-KV scratch buffer and
    is left untouched (nothing reads it back).
    """
    _check_not_cross("decode_attention_cpu", is_cross_attn, encoder_lens)
    hkv, d = k_cache.shape[-2], k_cache.shape[-1]
    if key is not None and value is not None:
        k_cache[loc] = key.reshape(-1, hkv, d).to(k_cache.dtype)
        v_cache[loc] = value.reshape(-1, hkv, v_cache.shape[-1]).to(v_cache.dtype)
    bsz = query.shape[0]
    if bsz == 0:
        return
    h = query.shape[1]
    g = h // hkv
    lens = seq_lens.to(torch.int64)
    max_len = int(lens.max())
    k_pos = torch.arange(max_len)
    valid = k_pos.unsqueeze(0) < lens.unsqueeze(1)  # [B, L]
    idx = req_to_token[req_pool_indices.to(torch.int64), :max_len].to(torch.int64).masked_fill(~valid, 0)
    k = _dequant(k_cache[idx], key_scale).permute(0, 2, 1, 3)  # [B, Hkv, L, D]
    v = _dequant(v_cache[idx], value_scale).permute(0, 2, 1, 3)
    q = query.to(torch.float32).reshape(bsz, hkv, g, 1, d)
    allowed = valid
    if sliding_window_size > 0:
        allowed = allowed & _window_mask(lens - 1, k_pos, sliding_window_size).squeeze(-2)
    out = _attend(q, k, v, allowed.view(bsz, 1, 1, 1, max_len), sm_scale, logit_cap, sinks)
    output.copy_(out.reshape(bsz, h, -1).to(output.dtype))


def _tree_mask_rows(tree_mask: torch.Tensor, ext_lens: list[int], seq_lens: list[int]) -> list[torch.Tensor]:
    """Split a flat tree mask into per-request [E, E] blocks over the extend tokens.

    Accepts SGLang's QLEN_ONLY layout (what the CPU engine builds: ``E*E`` per request) and the FULL_MASK layout
    (``E * seq_len`` per request, prefix columns included, whose last E columns are the same block).
    """
    flat = tree_mask.reshape(-1).to(torch.bool)
    qlen_total = sum(e * e for e in ext_lens)
    full_total = sum(e * s for e, s in zip(ext_lens, seq_lens))
    blocks, off = [], 0
    if flat.numel() >= qlen_total and (flat.numel() < full_total or qlen_total == full_total):
        for e in ext_lens:
            blocks.append(flat[off:off + e * e].view(e, e))
            off += e * e
    elif flat.numel() >= full_total:
        for e, s in zip(ext_lens, seq_lens):
            blocks.append(flat[off:off + e * s].view(e, s)[:, s - e:])
            off += e * s
    else:
        raise ValueError(f"sgl_kernel stand-in extend_attention_cpu: tree_mask has {flat.numel()} entries; "
                         f"expected {qlen_total} (QLEN_ONLY) or {full_total} (FULL_MASK)")
    return blocks


def extend_attention_cpu(q_extend: torch.Tensor, k_extend: Optional[torch.Tensor], v_extend: Optional[torch.Tensor],
                         o_extend: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor, key_scale: float,
                         value_scale: float, req_to_token: torch.Tensor, req_pool_indices: torch.Tensor,
                         seq_lens: torch.Tensor, extend_seq_lens: torch.Tensor, extend_start_loc: torch.Tensor,
                         max_len_extend: int, sm_scale: float, logit_cap: float, is_cross_attn: bool,
                         sliding_window_size: int, encoder_lens: Optional[torch.Tensor],
                         sinks: Optional[torch.Tensor], tree_mask: Optional[torch.Tensor], is_causal: bool) -> None:
    """Prefill / verify attention: each request's new tokens over its cached prefix plus themselves.

    Request ``i`` has ``E = extend_seq_lens[i]`` query rows starting at ``extend_start_loc[i]`` and a total length
    ``seq_lens[i]`` (prefix ``P = seq_len - E``). Keys/values are the prefix rows
    ``req_to_token[req, :P]`` of the cache followed by ``k_extend``/``v_extend`` for the new tokens (or the cache
    rows ``req_to_token[req, P:seq_len]`` when those are None, as for KV-shared layers). The prefix is always
    visible; among the new tokens visibility is the per-request ``tree_mask`` block (speculative verify: token i
    sees its tree ancestors and itself), else causal when ``is_causal``, else full. Writes ``o_extend``.
    """
    _check_not_cross("extend_attention_cpu", is_cross_attn, encoder_lens)
    hkv, d = k_buffer.shape[-2], k_buffer.shape[-1]
    dv = v_buffer.shape[-1]
    h = q_extend.shape[1]
    g = h // hkv
    lens = seq_lens.tolist()
    exts = extend_seq_lens.tolist()
    starts = extend_start_loc.tolist()
    reqs = req_pool_indices.tolist()
    masks = _tree_mask_rows(tree_mask, exts, lens) if tree_mask is not None and tree_mask.numel() > 0 else None
    for i, (total, ext, start, req) in enumerate(zip(lens, exts, starts, reqs)):
        if ext == 0:
            continue
        prefix = total - ext
        row = req_to_token[req]
        k_pre = _dequant(k_buffer[row[:prefix].to(torch.int64)], key_scale)
        v_pre = _dequant(v_buffer[row[:prefix].to(torch.int64)], value_scale)
        if k_extend is not None and v_extend is not None:
            k_new = k_extend[start:start + ext].reshape(ext, hkv, d).to(torch.float32)
            v_new = v_extend[start:start + ext].reshape(ext, hkv, dv).to(torch.float32)
        else:
            new_locs = row[prefix:total].to(torch.int64)
            k_new = _dequant(k_buffer[new_locs], key_scale)
            v_new = _dequant(v_buffer[new_locs], value_scale)
        k = torch.cat([k_pre, k_new]).permute(1, 0, 2)  # [Hkv, L, D]
        v = torch.cat([v_pre, v_new]).permute(1, 0, 2)
        q = q_extend[start:start + ext].to(torch.float32).reshape(ext, hkv, g, d).permute(1, 2, 0, 3)
        allowed = torch.ones(ext, total, dtype=torch.bool)
        if masks is not None:
            allowed[:, prefix:] = masks[i]
        elif is_causal:
            allowed[:, prefix:] = torch.ones(ext, ext, dtype=torch.bool).tril()
        if sliding_window_size > 0:
            allowed &= _window_mask(torch.arange(prefix, total), torch.arange(total), sliding_window_size)
        out = _attend(q, k, v, allowed, sm_scale, logit_cap, sinks)  # [Hkv, G, E, Dv]
        o_extend[start:start + ext] = out.permute(2, 0, 1, 3).reshape(ext, h, dv).to(o_extend.dtype)


def flash_attn_varlen_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                           cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, causal: bool = False,
                           sm_scale: Optional[float] = None) -> torch.Tensor:
    """Packed variable-length attention (vision encoders): sequence i is rows ``cu[i]:cu[i+1]`` of q and of k/v.

    Causal masking aligns the last query with the last key (flash-attn convention). Returns [total_q, H, Dv].
    """
    h, hkv, d = q.shape[1], k.shape[1], q.shape[2]
    g = h // hkv
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(d)
    out = q.new_empty(q.shape[0], h, v.shape[2])
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for i in range(len(cq) - 1):
        tq, tk = cq[i + 1] - cq[i], ck[i + 1] - ck[i]
        if tq == 0:
            continue
        qi = q[cq[i]:cq[i + 1]].to(torch.float32).reshape(tq, hkv, g, d).permute(1, 2, 0, 3)
        ki = k[ck[i]:ck[i + 1]].to(torch.float32).permute(1, 0, 2)
        vi = v[ck[i]:ck[i + 1]].to(torch.float32).permute(1, 0, 2)
        allowed = None
        if causal:
            allowed = torch.arange(tk).unsqueeze(0) <= (torch.arange(tq).unsqueeze(1) + (tk - tq))
        o = _attend(qi, ki, vi, allowed, scale, 0.0, None)
        out[cq[i]:cq[i + 1]] = o.permute(2, 0, 1, 3).reshape(tq, h, -1).to(out.dtype)
    return out


# ----------------------------------------------------------------------------------------------------------------
# KV cache and request-to-token bookkeeping
# ----------------------------------------------------------------------------------------------------------------


def store_cache_cpu(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    indices: torch.Tensor, row_dim: int) -> None:
    """Scatter: row ``j`` of ``k``/``v`` (``row_dim`` = heads * head_dim wide) into cache row ``indices[j]``."""
    idx = indices.to(torch.int64)
    k_cache.view(-1, row_dim)[idx] = k.reshape(-1, row_dim).to(k_cache.dtype)
    v_cache.view(-1, row_dim)[idx] = v.reshape(-1, row_dim).to(v_cache.dtype)


def copy_all_layer_kv_cache_cpu(data_ptrs: torch.Tensor, strides: torch.Tensor, tgt_loc: torch.Tensor,
                                src_loc: torch.Tensor) -> None:
    """For every buffer (a raw base address with a row stride in bytes): copy row ``src_loc[j]`` to ``tgt_loc[j]``.

    All source rows are read before any target row is written, so overlapping moves are safe (as in the Triton
    ``copy_all_layer_kv_cache_tiled``). The buffers are reached by address because that is all the op receives.
    """
    if tgt_loc.numel() == 0:
        return
    tgt, src = tgt_loc.to(torch.int64), src_loc.to(torch.int64)
    rows = int(torch.maximum(tgt.max(), src.max())) + 1
    for ptr, stride in zip(data_ptrs.view(torch.int64).tolist(), strides.to(torch.int64).tolist()):
        raw = (ctypes.c_uint8 * (rows * stride)).from_address(ptr & 0xFFFFFFFFFFFFFFFF)
        buf = torch.frombuffer(raw, dtype=torch.uint8).view(rows, stride)
        buf[tgt] = buf[src]


def _row_offsets(start: list[int], end: list[int]) -> list[int]:
    """Where each request's slice begins in a packed output: the sum of the earlier requests' lengths."""
    out, acc = [], 0
    for s, e in zip(start, end):
        out.append(acc)
        acc += e - s
    return out


def assign_req_to_token_pool_cpu(req_pool_indices: torch.Tensor, req_to_token: torch.Tensor,
                                 start_offset: torch.Tensor, end_offset: torch.Tensor, out_cache_loc: torch.Tensor,
                                 pool_len: int) -> None:
    """``req_to_token[req_i, start_i:end_i] = out_cache_loc[packed slice i]`` (slices packed in request order)."""
    reqs, start, end = req_pool_indices.tolist(), start_offset.tolist(), end_offset.tolist()
    table = req_to_token.view(-1, pool_len)
    for req, s, e, off in zip(reqs, start, end, _row_offsets(start, end)):
        if e > s:
            table[req, s:e] = out_cache_loc[off:off + e - s].to(table.dtype)


def assign_extend_cache_locs_cpu(req_pool_indices: torch.Tensor, req_to_token: torch.Tensor,
                                 start_offset: torch.Tensor, end_offset: torch.Tensor, out_cache_loc: torch.Tensor,
                                 pool_len: int) -> None:
    """The inverse gather: ``out_cache_loc[packed slice i] = req_to_token[req_i, start_i:end_i]``."""
    reqs, start, end = req_pool_indices.tolist(), start_offset.tolist(), end_offset.tolist()
    table = req_to_token.view(-1, pool_len)
    for req, s, e, off in zip(reqs, start, end, _row_offsets(start, end)):
        if e > s:
            out_cache_loc[off:off + e - s] = table[req, s:e].to(out_cache_loc.dtype)


def assign_draft_cache_locs_contiguous_cpu(req_pool_indices: torch.Tensor, req_to_token: torch.Tensor,
                                           seq_lens: torch.Tensor, out_cache_loc: torch.Tensor, pool_len: int,
                                           topk: int, num_steps: int) -> None:
    """Request i's ``topk * num_steps`` draft slots: ``req_to_token[req_i, seq_len_i : seq_len_i + topk*steps]``
    copied to ``out_cache_loc[i*topk*steps : (i+1)*topk*steps]``."""
    width = topk * num_steps
    table = req_to_token.view(-1, pool_len)
    flat = out_cache_loc.view(-1)
    for i, (req, s) in enumerate(zip(req_pool_indices.tolist(), seq_lens.tolist())):
        flat[i * width:(i + 1) * width] = table[req, s:s + width].to(flat.dtype)


def build_draft_decode_metadata_cpu(req_to_token: torch.Tensor, req_pool_indices: torch.Tensor,
                                    seq_lens: torch.Tensor, topk: int, num_steps: int, pool_len: int) -> torch.Tensor:
    """A per-branch request-to-token table for the multi-step draft decode.

    Row ``i*topk + k`` is request i's row with the draft chain of branch k moved right after the prefix:
    ``[req_to_token[req_i, :seq_len_i], req_to_token[req_i, seq_len_i + k*steps : seq_len_i + (k+1)*steps]]``
    (the slots ``assign_draft_cache_locs_contiguous`` handed out; same layout as the Triton
    ``generate_draft_decode_kv_indices``). Draft step s of branch k then attends to ``seq_len_i + s + 1`` entries.
    """
    table = req_to_token.view(-1, pool_len)
    reqs = req_pool_indices.to(torch.int64)
    out = table[reqs].repeat_interleave(topk, dim=0).contiguous()
    for i, (req, s) in enumerate(zip(reqs.tolist(), seq_lens.tolist())):
        for k in range(1, topk):
            src = s + k * num_steps
            out[i * topk + k, s:s + num_steps] = table[req, src:src + num_steps]
    return out


def fill_bonus_tokens_cpu(accept_tokens: torch.Tensor, accept_lens: torch.Tensor, bonus_tokens: torch.Tensor,
                          accept_stride: int) -> None:
    """``bonus_tokens[i] = accept_tokens.flat[i*accept_stride + accept_lens[i] - 1]`` (the last accepted token)."""
    bsz = accept_lens.numel()
    idx = torch.arange(bsz, dtype=torch.int64) * accept_stride + accept_lens.to(torch.int64).view(-1) - 1
    bonus_tokens.view(-1)[:bsz] = accept_tokens.reshape(-1)[idx].to(bonus_tokens.dtype)


def fill_accept_out_cache_loc_cpu(accept_index: torch.Tensor, out_cache_loc: torch.Tensor,
                                  accept_out_cache_loc: torch.Tensor) -> None:
    """Compact: for each ``accept_index`` entry that is not -1, in order, append ``out_cache_loc[entry]``."""
    flat = accept_index.reshape(-1).to(torch.int64)
    kept = flat[flat != -1]
    accept_out_cache_loc.view(-1)[:kept.numel()] = out_cache_loc.view(-1)[kept].to(accept_out_cache_loc.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Speculative trees
# ----------------------------------------------------------------------------------------------------------------

_FULL_MASK, _QLEN_ONLY, _QLEN_ONLY_BITPACKING = 0, 1, 2


def _find(values: list[int], target: int, limit: int) -> int:
    """Index of the first ``target`` among the first ``limit`` values, or -1 (the kernels' linear search)."""
    for j in range(limit):
        if values[j] == target:
            return j
    return -1


def build_tree_kernel_efficient_cpu(parent_list: torch.Tensor, selected_index: torch.Tensor,
                                    verified_seq_len: torch.Tensor, tree_mask: torch.Tensor, positions: torch.Tensor,
                                    retrive_index: torch.Tensor, retrive_next_token: torch.Tensor,
                                    retrive_next_sibling: torch.Tensor, topk: int, depth: int, draft_token_num: int,
                                    tree_mask_mode: int) -> None:
    """EAGLE draft tree -> verify metadata; a line-by-line port of SGLang's Triton
    ``sgl_build_tree_kernel_efficient_triton`` (one Python pass per request; trees have a handful of nodes).

    Node 0 is the verified (bonus) token, node i >= 1 is ``selected_index[b, i-1]``; a node's parent is found through
    ``parent_list[b, selected // topk]``. Outputs: ``positions`` (depth + seq_len), ``retrive_index`` (b*n + i),
    first-child / next-sibling links (callers pre-fill them with -1), and each node's visibility row in
    ``tree_mask``: FULL_MASK = [n, seq_len + n] rows at the request's offset (prefix columns are the caller's),
    QLEN_ONLY = [n, n] rows, QLEN_ONLY_BITPACKING = one integer per row with bit j = column j.
    """
    n = draft_token_num
    bsz = verified_seq_len.numel()
    seq = verified_seq_len.tolist()
    sel = selected_index.reshape(bsz, -1).tolist()
    par = parent_list.reshape(bsz, -1).tolist()
    nxt = retrive_next_token.reshape(bsz, n).tolist()
    sib = retrive_next_sibling.reshape(bsz, n).tolist()
    pos = positions.reshape(-1).tolist()
    mask_idx: list[int] = []
    mask_val: list[int] = []
    prefix_sum = 0
    for b in range(bsz):
        seq_len = seq[b]
        pos[b * n] = seq_len
        for i in range(n - 1, 0, -1):
            parent_tb = sel[b][i - 1] // topk
            # parent_tb == 0: the parent is the root; else find the parent's node (j + 1), if it was selected
            parent_position = 0 if parent_tb == 0 else _find(sel[b], par[b][parent_tb], n - 1) + 1
            if parent_tb == 0 or parent_position > 0:
                prev = nxt[b][parent_position]
                nxt[b][parent_position] = i
                if prev != -1:
                    sib[b][i] = prev
        for x in range(n):
            cols = [0]
            if x > 0:
                cur, steps = x - 1, 0
                for _ in range(depth):
                    steps += 1
                    cols.append(cur + 1)
                    parent_tb = sel[b][cur] // topk
                    if parent_tb == 0:
                        break
                    cur = _find(sel[b], par[b][parent_tb], n - 1)
                    if cur < 0:
                        break
                pos[b * n + x] = steps + seq_len
            if tree_mask_mode == _QLEN_ONLY_BITPACKING:
                mask_idx.append(b * n + x)
                mask_val.append(sum(1 << c for c in set(cols)))
                continue
            if tree_mask_mode == _FULL_MASK:
                base = n * n * b + prefix_sum * n + (seq_len + n) * x + seq_len
            else:
                base = n * n * b + n * x
            row = [0] * n
            for c in cols:
                row[c] = 1
            mask_idx.extend(range(base, base + n))
            mask_val.extend(row)
        prefix_sum += seq_len
    retrive_index.view(bsz, n).copy_(torch.arange(bsz * n, dtype=torch.int64).view(bsz, n))
    retrive_next_token.view(bsz, n).copy_(torch.tensor(nxt, dtype=retrive_next_token.dtype))
    retrive_next_sibling.view(bsz, n).copy_(torch.tensor(sib, dtype=retrive_next_sibling.dtype))
    positions.view(-1).copy_(torch.tensor(pos, dtype=positions.dtype))
    if mask_idx:
        flat = tree_mask.view(-1)
        if flat.dtype in (torch.uint16, torch.uint32):  # limited index_put support: write the signed view
            flat = flat.view({torch.uint16: torch.int16, torch.uint32: torch.int32}[flat.dtype])
            bits = 16 if flat.dtype == torch.int16 else 32
            mask_val = [v - (1 << bits) if v >= 1 << (bits - 1) else v for v in mask_val]
        flat[torch.tensor(mask_idx, dtype=torch.int64)] = torch.tensor(mask_val).to(flat.dtype)


def verify_tree_greedy_cpu(predicts: torch.Tensor, accept_index: torch.Tensor, accept_token_num: torch.Tensor,
                           candidates: torch.Tensor, retrive_index: torch.Tensor, retrive_next_token: torch.Tensor,
                           retrive_next_sibling: torch.Tensor, target_predict: torch.Tensor) -> None:
    """Greedy tree verification; a port of SGLang's Triton ``verify_tree_greedy_kernel_triton``.

    Per request, walk down from the root: at each level take the first child (then its siblings) whose draft token
    equals the target's argmax at the last accepted node; stop when none does or after ``accept_index.shape[1] - 1``
    levels. Writes ``accept_index[b, 0..m]`` (retrieve indices of the root and the m accepted nodes),
    ``accept_token_num[b] = m``, ``predicts[node] = target token`` for every accepted node and the bonus token at the
    last one. Entries it does not reach keep the caller's fill (-1), exactly as the kernel leaves them.
    """
    bsz, n = candidates.shape[0], candidates.shape[1]
    spec = accept_index.shape[1]
    cand = candidates.tolist()
    ridx = retrive_index.reshape(bsz, n).tolist()
    nxt = retrive_next_token.reshape(bsz, n).tolist()
    sib = retrive_next_sibling.reshape(bsz, n).tolist()
    target = target_predict.reshape(-1).tolist()
    acc = accept_index.tolist()
    pred_idx: list[int] = []
    pred_val: list[int] = []
    num_acc: list[int] = []
    for b in range(bsz):
        last = ridx[b][0]
        acc[b][0] = last
        count, cur = 0, 0
        for _ in range(1, spec):
            cur = nxt[b][cur]
            want = target[last]
            matched = False
            for _ in range(n):
                if cur == -1:
                    break
                if cand[b][cur] == want:
                    pred_idx.append(last)
                    pred_val.append(want)
                    count += 1
                    acc[b][count] = ridx[b][cur]
                    last = ridx[b][cur]
                    matched = True
                    break
                cur = sib[b][cur]
            if not matched:
                break
        num_acc.append(count)
        pred_idx.append(last)
        pred_val.append(target[last])
    accept_index.copy_(torch.tensor(acc, dtype=accept_index.dtype))
    accept_token_num.view(-1)[:bsz] = torch.tensor(num_acc, dtype=accept_token_num.dtype)
    predicts.view(-1)[torch.tensor(pred_idx, dtype=torch.int64)] = torch.tensor(pred_val, dtype=predicts.dtype)


def reconstruct_indices_from_tree_mask_cpu(tree_mask: torch.Tensor, verified_seq_len: torch.Tensor,
                                           positions: torch.Tensor, retrive_index: torch.Tensor,
                                           retrive_next_token: torch.Tensor, retrive_next_sibling: torch.Tensor,
                                           batch_size: int, draft_token_num: int) -> None:
    """NGRAM: verify metadata from an ancestor mask ``tree_mask[b, i, j]`` (j is an ancestor of i, or i itself).

    With strict ancestors ``A[i, j] = mask[i, j] & (j < i)``: ``positions = #ancestors + seq_len``,
    ``retrive_index = b*n + i``, parent = the largest ancestor, first child = the smallest k with ``A[k, i]``,
    next sibling = the smallest k > i with the same parent (-1 for the root). Vectorised over the batch; same
    contract as SGLang's Triton ``_reconstruct_tree_mask_kernel``.
    """
    bsz, n = batch_size, draft_token_num
    if bsz == 0:
        return
    mask = tree_mask.reshape(-1)[:bsz * n * n].view(bsz, n, n).to(torch.bool)
    ar = torch.arange(n)
    row, col = ar.view(n, 1), ar.view(1, n)
    anc = mask & (col < row)  # [b, i, j]
    depth = anc.sum(-1)
    positions.view(-1)[:bsz * n] = (depth + verified_seq_len.reshape(-1)[:bsz].to(torch.int64).view(bsz, 1)).reshape(
        -1).to(positions.dtype)
    retrive_index.view(bsz, n).copy_(torch.arange(bsz * n, dtype=torch.int64).view(bsz, n))
    parent = torch.where(anc, col, -1).amax(-1)  # [b, i]
    first_child = torch.where(anc, row, n).amin(1)  # [b, j]: min over rows k
    next_token = torch.where(anc.any(1), first_child, -1)
    same_parent = (parent.unsqueeze(2) == parent.unsqueeze(1)) & (row > col)  # [b, k, tid]
    first_sibling = torch.where(same_parent, row, n).amin(1)
    next_sibling = torch.where((parent >= 0) & (first_sibling < n), first_sibling, -1)
    retrive_next_token.view(bsz, n).copy_(next_token)
    retrive_next_sibling.view(bsz, n).copy_(next_sibling)


# ----------------------------------------------------------------------------------------------------------------
# Dense layers: norms, activations, rotary, linear
# ----------------------------------------------------------------------------------------------------------------


def rmsnorm_cpu(input: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x * rsqrt(mean(x^2) + eps) * weight`` over the last dim, computed in float32, returned in x's dtype."""
    x = input.to(torch.float32)
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.to(torch.float32)).to(input.dtype)


def fused_add_rmsnorm_cpu(input: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    """In place: ``residual += input``, then ``input = rmsnorm(residual) * weight``."""
    total = input.to(torch.float32) + residual.to(torch.float32)
    residual.copy_(total.to(residual.dtype))
    input.copy_(rmsnorm_cpu(total, weight, eps).to(input.dtype))


def silu_and_mul_cpu(input: torch.Tensor) -> torch.Tensor:
    """``silu(x[..., :d]) * x[..., d:]`` with ``d`` half the last dim."""
    d = input.shape[-1] // 2
    x = input.to(torch.float32)
    return (torch.nn.functional.silu(x[..., :d]) * x[..., d:]).to(input.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, is_neox: bool) -> torch.Tensor:
    """SGLang's ``apply_rotary_emb``: NeoX rotates halves, GPT-J rotates interleaved pairs."""
    if is_neox:
        x1, x2 = x.chunk(2, dim=-1)
    else:
        x1, x2 = x[..., ::2], x[..., 1::2]
    o1 = x1 * cos - x2 * sin
    o2 = x2 * cos + x1 * sin
    return torch.cat((o1, o2), dim=-1) if is_neox else torch.stack((o1, o2), dim=-1).flatten(-2)


def rotary_embedding_cpu(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, head_size: int,
                         cos_sin_cache: torch.Tensor, is_neox: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE from a ``[max_pos, rot_dim]`` cache (cos half, then sin half) on the first ``rot_dim`` of each head.

    Returns new (query, key) of the input shapes ([T, H*D] or [T, H, D]); the inputs are not modified.
    """
    pos = positions.reshape(-1).to(torch.int64)
    cos, sin = cos_sin_cache.index_select(0, pos).to(torch.float32).chunk(2, dim=-1)
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    rot = cos_sin_cache.shape[-1]

    def apply(x: torch.Tensor) -> torch.Tensor:
        xs = x.reshape(pos.numel(), -1, head_size).to(torch.float32)
        out = torch.cat((_rotate(xs[..., :rot], cos, sin, is_neox), xs[..., rot:]), dim=-1)
        return out.reshape(x.shape).to(x.dtype)

    return apply(query), apply(key)


def apply_rotary_pos_emb_cpu(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                             unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """HF-style RoPE with full-width cos/sin: ``x * cos + rotate_half(x) * sin`` (float32 math)."""
    c = cos.unsqueeze(unsqueeze_dim).to(torch.float32)
    s = sin.unsqueeze(unsqueeze_dim).to(torch.float32)

    def apply(x: torch.Tensor) -> torch.Tensor:
        xf = x.to(torch.float32)
        x1, x2 = xf.chunk(2, dim=-1)
        return (xf * c + torch.cat((-x2, x1), dim=-1) * s).to(x.dtype)

    return apply(q), apply(k)


def convert_weight_packed(weight: torch.Tensor) -> torch.Tensor:
    """AMX weight packing. The stand-in keeps the plain [N, K] layout (a copy, since the op returns a new tensor)."""
    return weight.clone()


def weight_packed_linear(mat1: torch.Tensor, mat2: torch.Tensor, bias: Optional[torch.Tensor],
                         is_vnni: bool) -> torch.Tensor:
    """``mat1 @ mat2.T + bias`` with ``mat2`` as :func:`convert_weight_packed` returned it ([N, K])."""
    w = mat2.to(mat1.dtype)
    return torch.nn.functional.linear(mat1, w, None if bias is None else bias.to(mat1.dtype))


# ----------------------------------------------------------------------------------------------------------------
# Process setup
# ----------------------------------------------------------------------------------------------------------------


def _parse_cpu_ids(cpu_ids: str) -> list[int]:
    """``"0-3,6"`` -> [0, 1, 2, 3, 6]."""
    ids: list[int] = []
    for part in filter(None, re.split(r"[,\s]+", cpu_ids.strip())):
        lo, _, hi = part.partition("-")
        ids.extend(range(int(lo), int(hi or lo) + 1))
    return ids


def init_cpu_threads_env(cpu_ids: str) -> str:
    """Size the intra-op thread pool to the listed cores.

    The C++ op also pins each OpenMP thread to a core; the stand-in does not pin, because the machines it runs on
    are small and shared and a pinned server would contend with the test process for that one core.
    """
    ids = _parse_cpu_ids(cpu_ids)
    if ids:
        torch.set_num_threads(len(ids))
    return f"sgl_kernel stand-in: {torch.get_num_threads()} intra-op thread(s) for cores {ids} (not pinned)"


def initialize(size: int, rank: int) -> None:
    """Shared-memory all-reduce setup; only one rank (tensor parallel size 1) is supported by the stand-in."""
    if size != 1:
        raise NotImplementedError(f"sgl_kernel stand-in initialize: tp size {size} (rank {rank}); only 1 works")


# ----------------------------------------------------------------------------------------------------------------
# Import-time-only references
# ----------------------------------------------------------------------------------------------------------------


class _NotImplementedOp:
    """What SGLang modules bind at import time but a Llama-family model never calls; any call raises."""

    def __init__(self, name: str) -> None:
        self.__name__ = name
        self.default = self

    def __call__(self, *args, **kwargs):
        raise NotImplementedError(f"sgl_kernel stand-in: op {self.__name__} is not implemented (test stand-in "
                                  f"only covers the ops a Llama model with NGRAM/EAGLE3 uses)")

    def __repr__(self) -> str:
        return f"<sgl_kernel stand-in stub {self.__name__}>"


# Referenced at module level by sglang.srt.models.{grok,qwen3_5,muse_glimmer}, layers/conv.py and the GDN linear
# attention backends. Deliberately *not* every op name SGLang mentions: several code paths test
# ``hasattr(torch.ops.sgl_kernel, name)`` to pick a fused path, and those must keep seeing False.
IMPORT_TIME_ONLY_OPS = (
    "fused_moe_router_cpu",
    "fused_dual_residual_rmsnorm_cpu",
    "fused_sigmoid_mul_cpu",
    "fused_qk_gemma_rmsnorm_cpu",
    "fused_qk_gemma_rmsnorm_with_gate_cpu",
    "fused_qkvzba_split_reshape_cat_contiguous_cpu",
    "fused_gdn_gating_cpu",
    "fused_sigmoid_gating_delta_rule_update_cpu",
    "conv3d_embed_cpu",
)

# (schema, implementation); the schemas are the ones SGLang 0.5.23's CPU build declares.
OPS: tuple[tuple[str, Callable], ...] = (
    ("copy_all_layer_kv_cache_cpu(Tensor data_ptrs, Tensor strides, Tensor tgt_loc, Tensor src_loc) -> ()",
     copy_all_layer_kv_cache_cpu),
    ("assign_req_to_token_pool_cpu(Tensor req_pool_indices, Tensor(a!) req_to_token, Tensor start_offset, "
     "Tensor end_offset, Tensor out_cache_loc, int pool_len) -> ()", assign_req_to_token_pool_cpu),
    ("assign_extend_cache_locs_cpu(Tensor req_pool_indices, Tensor req_to_token, Tensor start_offset, "
     "Tensor end_offset, Tensor(a!) out_cache_loc, int pool_len) -> ()", assign_extend_cache_locs_cpu),
    ("assign_draft_cache_locs_contiguous_cpu(Tensor req_pool_indices, Tensor req_to_token, Tensor seq_lens, "
     "Tensor(a!) out_cache_loc, int pool_len, int topk, int num_steps) -> ()", assign_draft_cache_locs_contiguous_cpu),
    ("fill_bonus_tokens_cpu(Tensor accept_tokens, Tensor accept_lens, Tensor(a!) bonus_tokens, "
     "int accept_stride) -> ()",
     fill_bonus_tokens_cpu),
    ("fill_accept_out_cache_loc_cpu(Tensor accept_index, Tensor out_cache_loc, Tensor(a!) accept_out_cache_loc) -> ()",
     fill_accept_out_cache_loc_cpu),
    ("build_tree_kernel_efficient_cpu(Tensor parent_list, Tensor selected_index, Tensor verified_seq_len, "
     "Tensor(a!) tree_mask, Tensor(b!) positions, Tensor(c!) retrive_index, Tensor(d!) retrive_next_token, "
     "Tensor(e!) retrive_next_sibling, int topk, int depth, int draft_token_num, int tree_mask_mode) -> ()",
     build_tree_kernel_efficient_cpu),
    ("verify_tree_greedy_cpu(Tensor(a!) predicts, Tensor(b!) accept_index, Tensor(c!) accept_token_num, "
     "Tensor candidates, Tensor retrive_index, Tensor retrive_next_token, Tensor retrive_next_sibling, "
     "Tensor target_predict) -> ()", verify_tree_greedy_cpu),
    ("reconstruct_indices_from_tree_mask_cpu(Tensor tree_mask, Tensor verified_seq_len, Tensor(a!) positions, "
     "Tensor(b!) retrive_index, Tensor(c!) retrive_next_token, Tensor(d!) retrive_next_sibling, int batch_size, "
     "int draft_token_num) -> ()", reconstruct_indices_from_tree_mask_cpu),
    ("decode_attention_cpu(Tensor query, Tensor(a!) k_cache, Tensor(b!) v_cache, float key_scale, float value_scale, "
     "Tensor(c!) output, Tensor? key, Tensor? value, Tensor loc, Tensor(d!) attn_logits, Tensor req_to_token, "
     "Tensor req_pool_indices, Tensor seq_lens, float sm_scale, float logit_cap, bool is_cross_attn, "
     "int sliding_window_size, Tensor? encoder_lens, Tensor? sinks) -> ()", decode_attention_cpu),
    ("extend_attention_cpu(Tensor q_extend, Tensor? k_extend, Tensor? v_extend, Tensor(a!) o_extend, "
     "Tensor k_buffer, Tensor v_buffer, float key_scale, float value_scale, Tensor req_to_token, "
     "Tensor req_pool_indices, Tensor seq_lens, Tensor extend_seq_lens, Tensor extend_start_loc, int max_len_extend, "
     "float sm_scale, float logit_cap, bool is_cross_attn, int sliding_window_size, Tensor? encoder_lens, "
     "Tensor? sinks, Tensor? tree_mask, bool is_causal) -> ()", extend_attention_cpu),
    ("build_draft_decode_metadata_cpu(Tensor req_to_token, Tensor req_pool_indices, Tensor seq_lens, int topk, "
     "int num_steps, int pool_len) -> Tensor", build_draft_decode_metadata_cpu),
    ("convert_weight_packed(Tensor weight) -> Tensor", convert_weight_packed),
    ("weight_packed_linear(Tensor mat1, Tensor mat2, Tensor? bias, bool is_vnni) -> Tensor", weight_packed_linear),
    ("rmsnorm_cpu(Tensor input, Tensor weight, float eps) -> Tensor", rmsnorm_cpu),
    ("fused_add_rmsnorm_cpu(Tensor(a!) input, Tensor(b!) residual, Tensor weight, float eps) -> ()",
     fused_add_rmsnorm_cpu),
    ("silu_and_mul_cpu(Tensor input) -> Tensor", silu_and_mul_cpu),
    ("rotary_embedding_cpu(Tensor positions, Tensor query, Tensor key, int head_size, Tensor cos_sin_cache, "
     "bool is_neox) -> (Tensor, Tensor)", rotary_embedding_cpu),
    ("apply_rotary_pos_emb_cpu(Tensor q, Tensor k, Tensor cos, Tensor sin, int unsqueeze_dim=1) -> (Tensor, Tensor)",
     apply_rotary_pos_emb_cpu),
    # SGLang's vision code calls this with causal= as a keyword and no sm_scale, so both get defaults here.
    ("flash_attn_varlen_func(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
     "int max_seqlen_q, int max_seqlen_k, bool causal=False, float? sm_scale=None) -> Tensor", flash_attn_varlen_func),
    ("store_cache_cpu(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor indices, int row_dim) -> ()",
     store_cache_cpu),
    ("init_cpu_threads_env(str cpu_ids) -> str", init_cpu_threads_env),
    ("initialize(int size, int rank) -> ()", initialize),
)

# Ops without a tensor argument have no CPU dispatch key to select; they are bound for every backend.
_TENSORLESS = {"init_cpu_threads_env", "initialize"}


# Diagnostics: with SGLANG_EXT_STANDIN_OPCOUNT=<dir>, each process keeps per-op call counts in <dir>/ops-<pid>.json
# (rewritten at most every 2 s while ops run), to show which stand-in ops a server run actually exercised.
OPCOUNT_ENV = "SGLANG_EXT_STANDIN_OPCOUNT"
_counts: dict[str, int] = {}
_last_dump = [0.0]


def _counted(name: str, fn: Callable, out_dir: str) -> Callable:
    path = os.path.join(out_dir, f"ops-{os.getpid()}.json")

    def wrapper(*args, **kwargs):
        _counts[name] = _counts.get(name, 0) + 1
        now = time.monotonic()
        if now - _last_dump[0] > 2.0:
            _last_dump[0] = now
            with open(path, "w") as f:
                json.dump(_counts, f, sort_keys=True)
        return fn(*args, **kwargs)

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


def register() -> bool:
    """Define and implement every op in :data:`OPS`, and bind the stubs; False if they were already there."""
    global _LIB
    if _already_registered():
        return False
    _LIB = torch.library.Library("sgl_kernel", "DEF")
    count_dir = os.environ.get(OPCOUNT_ENV)
    for schema, fn in OPS:
        name = schema.split("(", 1)[0]
        _LIB.define(schema)
        impl = _counted(name, fn, count_dir) if count_dir else fn
        _LIB.impl(name, impl, "CompositeExplicitAutograd" if name in _TENSORLESS else "CPU")
    namespace = torch.ops.sgl_kernel
    for name in IMPORT_TIME_ONLY_OPS:
        if not hasattr(namespace, name):
            _STUBS[name] = _NotImplementedOp(name)
            setattr(namespace, name, _STUBS[name])
    return True


register()
