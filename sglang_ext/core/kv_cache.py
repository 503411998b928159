r"""A slot-based KV cache with per-request lengths, tree writes and rollback.

Layout: one buffer per layer of shape ``[S, H_kv, L_max, D]`` for keys and one for values, where slot ``s``
belongs to one live request. ``lengths[s]`` is how many positions of slot ``s`` are *committed*.

One forward writes ``T`` new positions per request at ``lengths[s] + j`` (``j < T``), tree nodes included.
Nothing is committed until :meth:`commit` is told which of those ``T`` written entries survive: for a chain
the accepted nodes are a prefix and nothing moves; for a tree the accepted path's entries are gathered to
``lengths[s], lengths[s]+1, ...`` and the rest is simply left behind (it is overwritten by the next write).
That is the whole rollback: rejected drafts never become visible because attention masks everything at or
beyond ``lengths[s]`` that is not an ancestor in the current tree.

Batch rows are slots ``0..B-1``: the owner keeps live requests in a prefix of slots (:meth:`move` fills the
hole a finished request leaves), so every forward uses views, never a gather of the whole cache.
"""

from __future__ import annotations

import mmap
import os
import warnings

import torch

#: ``SGLANG_EXT_LAZY_KV=0`` allocates caches with ``torch.zeros`` (every page committed up front) instead of
#: :func:`lazy_zeros`; the contents are identical, only resident memory differs
LAZY_ENV = "SGLANG_EXT_LAZY_KV"


def lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """A zero-filled tensor whose untouched pages are never committed (CPU); ``torch.zeros`` elsewhere.

    ``torch.zeros`` on CPU allocates and then memsets, so every page of a preallocated KV cache is resident from
    the start. Here the block is an anonymous private mapping: the kernel hands out zero pages on first touch,
    so resident memory follows the positions actually written or read, and unmapping returns it at once. The
    zeros matter (never-written positions are read under a mask, and ``0 * NaN = NaN``), so the contents are
    the same as ``torch.zeros``, not ``torch.empty``'s. The mapping asks for small pages: a cache is touched in
    a few positions of each ``[slot, head]`` row (about 1 MiB apart for a 4096-token context), and transparent
    huge pages (which NumPy's large ``zeros`` request) would commit 2 MiB per touch, i.e. the whole cache, and
    stall in compaction. Bytes viewed as ``dtype`` cover dtypes NumPy lacks (bfloat16). Page-aligned.
    """
    device = torch.device(device)
    numel = 1
    for n in shape:
        numel *= int(n)
    if device.type != "cpu" or numel == 0 or os.environ.get(LAZY_ENV, "1") == "0":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    block = mmap.mmap(-1, nbytes)  # anonymous: zero-filled on first touch
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        block.madvise(mmap.MADV_NOHUGEPAGE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # frombuffer's note that the buffer is shared, which is the point
        raw = torch.frombuffer(block, dtype=torch.uint8)  # holds a reference to the mapping
    return raw.view(dtype).view(shape)


class SlotKVCache:
    def __init__(self, num_layers: int, num_slots: int, num_kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        shape = (num_slots, num_kv_heads, max_len, head_dim)
        # one buffer for every layer's keys and values, so commit/move gather all layers in one op;
        # ``keys[l]`` / ``values[l]`` are views of it (the per-layer layout above is unchanged)
        # zero-filled, but on CPU only the pages of positions in use become resident (lazy_zeros)
        self.storage = lazy_zeros((2, num_layers, *shape), dtype=dtype, device=device)
        self.keys = list(self.storage[0].unbind(0))
        self.values = list(self.storage[1].unbind(0))
        self.lengths = torch.zeros(num_slots, dtype=torch.long)
        self.num_slots = num_slots
        self.max_len = max_len
        self.device = torch.device(device)

    # ---- bookkeeping -------------------------------------------------------------------------------
    def commit(self, slot: int, written_index: list[int]) -> None:
        """Keep the entries written at ``lengths[slot] + i`` for ``i`` in ``written_index`` (in order) as committed.

        ``written_index`` must be increasing (tree nodes are in topological order, so a root-to-node path is).
        """
        base = int(self.lengths[slot])
        n = len(written_index)
        if n == 0:
            return
        if base + n > self.max_len:
            raise ValueError(f"slot {slot}: committing {n} entries past the cache length {self.max_len}")
        if written_index != list(range(n)):
            src = torch.tensor(written_index, device=self.device) + base
            dst = torch.arange(n, device=self.device) + base
            st = self.storage  # [2, layers, S, H, L, D]: every layer's keys and values in one gather
            st[:, :, slot, :, dst] = st[:, :, slot, :, src]
        self.lengths[slot] = base + n

    def truncate(self, slot: int, length: int) -> None:
        """Forget everything of ``slot`` from position ``length`` on."""
        if length < 0 or length > int(self.lengths[slot]):
            raise ValueError(f"slot {slot}: cannot truncate to {length} (length {int(self.lengths[slot])})")
        self.lengths[slot] = length

    def move(self, src: int, dst: int) -> None:
        """Copy slot ``src``'s committed entries into slot ``dst`` (keeps live requests in a slot prefix)."""
        n = int(self.lengths[src])
        self.storage[:, :, dst, :, :n] = self.storage[:, :, src, :, :n]
        self.lengths[dst] = n
        self.lengths[src] = 0

    def reset(self, slot: int) -> None:
        self.lengths[slot] = 0

    def nbytes(self) -> int:
        """Bytes reserved (nominal size: on CPU only the touched part is resident, :func:`lazy_zeros`)."""
        return self.storage.numel() * self.storage.element_size()


def step_attention_mask(lengths: torch.Tensor, visible: torch.Tensor, kv_len: int) -> torch.Tensor:
    r"""Boolean mask ``[B, 1, T, kv_len]`` for a forward whose ``T`` queries see a scratch region of ``S`` entries.

    The scratch region of request ``b`` is cache positions ``lengths[b] .. lengths[b] + S - 1``: the nodes this
    forward writes (and, when drafting a tree depth by depth, the nodes written by earlier depths). Query ``i``
    may attend to

    .. math:: \{\, j < \text{lengths}[b] \,\} \ \cup\ \{\, \text{lengths}[b] + s : \text{visible}[b, i, s] \,\}

    ``visible [B, T, S]`` is ancestor-or-self (a causal lower triangle for a chain or a prefill chunk).
    """
    B, T, S = visible.shape
    pos = torch.arange(kv_len, device=visible.device)
    lengths = lengths.to(visible.device)
    context = (pos.view(1, 1, kv_len) < lengths.view(B, 1, 1)).expand(B, T, kv_len)
    rel = pos.view(1, kv_len) - lengths.view(B, 1)  # [B, kv]: offset into the scratch region
    in_scratch = (rel >= 0) & (rel < S)
    idx = rel.clamp(0, S - 1).view(B, 1, kv_len).expand(B, T, kv_len)
    from_scratch = visible.gather(2, idx) & in_scratch.view(B, 1, kv_len)
    return (context | from_scratch).unsqueeze(1)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, HF's convention (``cos, sin [B, 1, T, D]``)."""
    return x * cos + rotate_half(x) * sin


class StepLayout:
    """Where one forward's ``T`` nodes go in the cache, and what they see (shared by every layer of the forward).

    ``first_slot``: the batch is slots ``first_slot .. first_slot + B - 1``. ``write_offset``: the nodes are
    written at ``lengths + write_offset + arange(T)`` (0 for the target; the depth-so-far when drafting a
    tree). ``visible [B, T, S]`` with ``S = write_offset + T`` as in :func:`step_attention_mask`.

    Everything per-forward (write indices, the mask and its additive form) is computed once here, so the
    per-layer :meth:`attend` is two copies and one SDPA call. When every row writes at the same offset (always
    at batch 1) the writes are plain slice copies instead of an indexed scatter.
    """

    def __init__(self, cache: SlotKVCache, batch: int, visible: torch.Tensor, write_offset: int = 0,
                 first_slot: int = 0) -> None:
        T = visible.shape[1]
        if visible.shape[2] != write_offset + T:
            raise ValueError(f"visible must be [B, T, write_offset + T], got {tuple(visible.shape)} with offset {write_offset}")
        self.cache, self.batch, self.first_slot, self.num_new = cache, batch, first_slot, T
        dev = cache.device
        self.lengths = cache.lengths[first_slot:first_slot + batch].to(dev)
        starts = [n + write_offset for n in cache.lengths[first_slot:first_slot + batch].tolist()]
        self.kv_len = max(starts) + T
        if self.kv_len > cache.max_len:
            raise ValueError(f"a request would need {self.kv_len} cache positions; the cache holds {cache.max_len}")
        # one start for all rows: slice writes; otherwise a scatter with indices built once per forward
        self._slice = (starts[0], starts[0] + T) if min(starts) == max(starts) else None
        self.write_offset = write_offset
        self._write_pos: torch.Tensor | None = None
        self._flat: torch.Tensor | None = None
        if self._slice is None:  # row of every (slot, head, position) in a layer buffer viewed as [S * H * L, D]
            H = cache.keys[0].shape[1] if cache.keys else 0
            slots = torch.arange(first_slot, first_slot + batch, device=dev).view(batch, 1, 1)
            heads = torch.arange(H, device=dev).view(1, H, 1)
            self._flat = ((slots * H + heads) * cache.max_len + self.write_pos.view(batch, 1, T)).reshape(-1)
        self.mask = step_attention_mask(self.lengths, visible.to(dev), self.kv_len)
        self._bias: dict[torch.dtype, torch.Tensor] = {}

    @property
    def write_pos(self) -> torch.Tensor:
        """``[B, T]`` cache position of every new node."""
        if self._write_pos is None:
            B, T = self.batch, self.num_new
            self._write_pos = (self.lengths.view(B, 1) + self.write_offset
                               + torch.arange(T, device=self.cache.device).view(1, T))
        return self._write_pos

    def attn_bias(self, dtype: torch.dtype) -> torch.Tensor:
        """The mask in the additive form SDPA converts a boolean mask to (0 where visible, -inf elsewhere), built once."""
        bias = self._bias.get(dtype)
        if bias is None:
            bias = torch.zeros(self.mask.shape, dtype=dtype, device=self.mask.device).masked_fill_(~self.mask, float("-inf"))
            self._bias[dtype] = bias
        return bias

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write ``k, v [B, H_kv, T, D]`` for ``layer`` at this forward's positions."""
        c, s0, B = self.cache, self.first_slot, self.batch
        if self._slice is not None:
            a, b = self._slice
            c.keys[layer][s0:s0 + B, :, a:b] = k
            c.values[layer][s0:s0 + B, :, a:b] = v
        else:
            kb, vb = c.keys[layer], c.values[layer]
            D = kb.shape[-1]
            kb.view(-1, D).index_copy_(0, self._flat, k.reshape(-1, D))
            vb.view(-1, D).index_copy_(0, self._flat, v.reshape(-1, D))

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """Write ``k, v [B, H_kv, T, D]``, then SDPA of ``q [B, H, T, D]`` over the visible cache → ``[B, T, H*D]``."""
        c, s0, B = self.cache, self.first_slot, self.batch
        self.write(layer, k, v)
        keys = c.keys[layer][s0:s0 + B, :, :self.kv_len]
        values = c.values[layer][s0:s0 + B, :, :self.kv_len]
        # the additive mask is exactly what SDPA makes of the boolean one (bit-identical output), made once per forward
        o = torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=self.attn_bias(q.dtype), scale=scale,
                                                             enable_gqa=q.shape[1] != k.shape[1])
        return o.transpose(1, 2).reshape(B, q.shape[2], -1)
