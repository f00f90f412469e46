"""The engine's prefix cache: keys and values of token blocks already computed, reused by later prompts that start
with the same tokens (a chat resending its conversation, a shared system prompt, n choices of one prompt).

Choices:
- Fixed blocks of `BLOCK` tokens, keyed by a hash chain as vLLM's automatic prefix caching does: a block's key
  is the hash of its parent's key and its own tokens, so a key stands for the whole prefix up to the block's end.
  Each block also keeps its parent key and tokens, and a lookup compares them, so a hash collision can never
  hand out another prefix's keys.
- A block holds a copy of its K/V, every layer, (n_layers, 2, n_kv, BLOCK, hd), in the cache's dtype and device;
  the engine's cache rows stay contiguous per row (quark/model.py's KVCache), so a reused prefix is copied in
  (one copy per layer and K/V for the whole run of blocks) and only the rest of the prompt is prefilled.
- Only full blocks are kept, and a lookup leaves at least the prompt's last token to compute (its logits are
  the first token's distribution).
- Blocks are added when a prompt has been prefilled (so requests admitted right after reuse it) and when a
  sequence ends (prompt and reply: the next turn of a chat starts with them).
- LRU under a byte budget. A lookup or an insert touches its chain deepest block first, so a chain's root is
  its most recent block and eviction takes leaves before the prefixes they extend.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch

from ..model import KVCache

BLOCK = 16
DEFAULT_MB = 512


class PrefixCache:
    """Blocks of K/V under a byte budget (see the module docstring). `stats()` for /health."""

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                 budget_bytes: int):
        self.shape = (n_layers, 2, n_kv_heads, BLOCK, head_dim)
        self.dtype, self.device = dtype, device
        self.block_bytes = n_layers * 2 * n_kv_heads * BLOCK * head_dim * torch.empty((), dtype=dtype).element_size()
        self.capacity = budget_bytes // self.block_bytes
        self.blocks: OrderedDict[int, tuple[int | None, tuple[int, ...], torch.Tensor]] = OrderedDict()
        self.counts = {"lookups": 0, "hits": 0, "lookup_tokens": 0, "hit_tokens": 0, "evicted_blocks": 0}

    @staticmethod
    def keys(tokens: Sequence[int]) -> list[int]:
        """The hash chain of the full blocks of `tokens`."""
        out, parent = [], None
        for s in range(0, len(tokens) - BLOCK + 1, BLOCK):
            parent = hash((parent, tuple(tokens[s:s + BLOCK])))
            out.append(parent)
        return out

    def match(self, tokens: Sequence[int], keys: list[int] | None = None, whole: bool = False) -> list[int]:
        """Keys of the cached blocks that start `tokens`, leaving its last token out unless `whole`."""
        n = (len(tokens) - (0 if whole else 1)) // BLOCK
        keys = self.keys(tokens[:n * BLOCK]) if keys is None else keys[:n]
        parent, found = None, []
        for i, key in enumerate(keys):
            b = self.blocks.get(key)
            if b is None or b[0] != parent or b[1] != tuple(tokens[i * BLOCK:(i + 1) * BLOCK]):
                break
            found.append(key)
            parent = key
        return found

    def lookup(self, tokens: Sequence[int], keys: list[int] | None = None) -> list[int]:
        """`match`, counted and touched."""
        found = self.match(tokens, keys)
        self.counts["lookups"] += 1
        self.counts["lookup_tokens"] += len(tokens)
        if found:
            self.counts["hits"] += 1
            self.counts["hit_tokens"] += len(found) * BLOCK
            self._touch(found)
        return found

    def copy_in(self, found: list[int], cache: KVCache, row: int) -> None:
        """Write the blocks `found` (a chain from the root) into slots 0.. of the cache's row `row`."""
        kv = torch.cat([self.blocks[k][2] for k in found], dim=3)  # (L, 2, n_kv, n * BLOCK, hd)
        n = kv.shape[3]
        for layer, (K, V) in enumerate(zip(cache.k, cache.v)):
            K[row, :, :n] = kv[layer, 0]
            V[row, :, :n] = kv[layer, 1]

    def insert(self, tokens: Sequence[int], cache: KVCache, row: int, keys: list[int] | None = None) -> None:
        """Keep the full blocks of `tokens`, whose K/V are in slots 0.. of the cache's row `row`."""
        if self.capacity == 0:
            return
        keys = self.keys(tokens) if keys is None else keys[:len(tokens) // BLOCK]
        have = len(self.match(tokens, keys, whole=True))
        self._touch(keys[:have])  # before any eviction below
        new = keys[have:][:self.capacity - have]
        if new:
            a, b = have * BLOCK, (have + len(new)) * BLOCK
            kv = torch.stack([torch.stack([K[row, :, a:b], V[row, :, a:b]]) for K, V in zip(cache.k, cache.v)])
            kv = kv.unflatten(3, (len(new), BLOCK)).movedim(3, 0)  # (n, L, 2, n_kv, BLOCK, hd)
            parent = keys[have - 1] if have else None
            for i, key in enumerate(new):
                s = (have + i) * BLOCK
                self.blocks[key] = (parent, tuple(tokens[s:s + BLOCK]), kv[i].clone())
                parent = key
            while len(self.blocks) > self.capacity:
                self.blocks.popitem(last=False)
                self.counts["evicted_blocks"] += 1
        self._touch(keys[:have + len(new)])

    def _touch(self, keys: list[int]) -> None:
        for key in reversed(keys):
            if key in self.blocks:
                self.blocks.move_to_end(key)

    def stats(self) -> dict:
        return {**self.counts, "blocks": len(self.blocks), "block_tokens": BLOCK,
                "bytes": len(self.blocks) * self.block_bytes, "budget_bytes": self.capacity * self.block_bytes}
