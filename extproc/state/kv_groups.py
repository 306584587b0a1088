"""Which KV-cache group of a hybrid model's endpoint the prefix index follows.

Hybrid models (sliding-window + full attention, Mamba) keep one block table per KV-cache group,
and vLLM publishes every group's stores and removals with the same block hashes, told apart only
by `group_idx`. Mixing them would be wrong both ways: a sliding-window group drops blocks that
the full-attention group still holds, and skips (null) blocks outside its window. So the index
follows exactly one group per endpoint (`GroupSelector`): the lowest group announced as full
attention (`kv_cache_spec_kind`), else the lowest group not seen to be windowed (a
`kv_cache_spec_sliding_window`, or a store with fewer hashes than token blocks: null blocks
skipped), else group 0. Events of other groups are skipped. vLLM 0.33 sends no kind on its GPU
path and orders groups by layer, so a model whose first layer is windowed (Gemma 3) starts on
group 0 and moves to the full-attention group as soon as a long prompt shows group 0's holes;
the move drops the endpoint's entries (a reset, reason `group`, in `extproc.state.kv_events`),
as nothing learned from the other group can be trusted.
"""

from __future__ import annotations

from typing import Final

from extproc.state.kv_decoding import BlockStored

# KV-cache spec kinds (vLLM's `KVCacheSpecKind`) whose group holds every block of a prefix.
FULL_ATTENTION_KINDS: Final = frozenset({"full_attention", "mla_attention", "sink_full_attention"})


class GroupSelector:
    """Which KV-cache group of one endpoint the index follows (the module docstring says why
    one, and which). Learns from the BlockStored events it sees; `learn` says when it moved."""

    def __init__(self) -> None:
        self.group = 0
        self._seen: set[int] = set()
        self._full: set[int] = set()
        self._windowed: set[int] = set()

    def learn(self, event: BlockStored) -> bool:
        g = event.group
        self._seen.add(g)
        kind = event.kv_cache_spec_kind
        if kind is not None:
            (self._full if kind in FULL_ATTENTION_KINDS else self._windowed).add(g)
        elif event.kv_cache_spec_sliding_window is not None or event.skips_blocks:
            self._windowed.add(g)
        if self._full:
            chosen = min(self._full)
        else:
            # With only windowed groups in sight, the lowest of them is the best there is.
            candidates = (self._seen - self._windowed) or self._seen
            chosen = min(candidates)
        moved = chosen != self.group
        self.group = chosen
        return moved
