"""KV layer states: one module per state type, all following `LayerState` (`kvjax.states.base`).

* `DenseKV` (`dense`): full precision, one slot per token and KV head.
* `RaggedKV` (`ragged`): per-head budgets in a flat pool (Ada-KV).
* `RollingKV` (`rolling`): fixed capacity, evicting while decoding (StreamingLLM, H2O, TOVA).
* `LatentKV` (`latent`): keys and values in learned subspaces (MatryoshkaKV).
* `PaluKV` (`palu`): low-rank latents of the pre-RoPE keys and of the values, RoPE re-applied (Palu).
* `MLAKV` (`mla`): multi-head latent attention's latents and shared RoPE keys (DeepSeek-V2).
* `ChannelKV` (`channels`): keys pruned to fewer channels per KV head (ThinK).
* `LocretKV` (`locret`): a Locret prefill's cache, scoring tokens with retaining heads.
* `WindowKV` (`window`): a ring of the last W tokens of a sliding-window layer (Gemma 3's local layers).
* `DuoKV` (`duo`): DuoAttention's retrieval heads (every token) beside its streaming heads (sinks + a
  recent window, evicting while decoding).
* `PagedKV` (`paged`): a page pool with a page table per row and KV head; eviction frees pages.
* `QuantStore` (`quantized`): keys and values stored quantized (codes, scales, zeros, outliers, the
  full-precision residual window and sink), held by a layout in the place of its K/V: `QuantKV`
  (`dense`, rows) and `QuantRaggedKV` (`ragged`, a per-head pool); `RollingKV` and `LatentKV` hold a
  `QuantKV` when quantized (`LayerState.quantize`).

`KVCache` (`cache`) holds them; `STATES` lists every state type (the registry-driven state tests).
"""
from kvjax.states.base import EMPTY_POS, LayerState, StoreBacked, tree_nbytes, write_slots
from kvjax.states.cache import KVCache, cache_nbytes, init_cache, kept_positions, memory_report
from kvjax.states.dense import DenseKV, QuantKV
from kvjax.states.latent import LatentKV, latent_cache
from kvjax.states.channels import ChannelKV
from kvjax.states.locret import LocretKV
from kvjax.states.merged import SharedBasisKV, SlerpKV
from kvjax.states.mla import MLAKV
from kvjax.states.palu import PaluKV
from kvjax.states.quantized import QuantStore
from kvjax.states.ragged import QuantRaggedKV, RaggedKV, ragged_from_selection
from kvjax.states.rolling import RollingKV
from kvjax.states.window import WindowKV
from kvjax.states.duo import DuoKV
from kvjax.states.paged import PagedKV

STATES = (DenseKV, RaggedKV, RollingKV, LatentKV, LocretKV, QuantKV, QuantRaggedKV, MLAKV, ChannelKV, WindowKV, DuoKV, PagedKV,
          SlerpKV, SharedBasisKV, PaluKV)

__all__ = ["EMPTY_POS", "LayerState", "StoreBacked", "KVCache", "DenseKV", "RaggedKV", "RollingKV", "LatentKV",
           "LocretKV", "MLAKV", "ChannelKV", "QuantKV", "QuantRaggedKV", "QuantStore", "STATES", "WindowKV", "DuoKV", "PagedKV", "SlerpKV", "SharedBasisKV", "PaluKV", "cache_nbytes", "init_cache", "kept_positions",
           "memory_report", "tree_nbytes", "write_slots", "latent_cache", "ragged_from_selection"]
