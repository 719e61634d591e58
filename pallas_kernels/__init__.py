"""Pallas kernels for compressed attention, each beside its plain-jnp `*_reference`.

* `decode_attention`: flash-decoding over a dense cache (GQA, per-row lengths).
* `quant_decode_attention`: the same over bit-packed quantized K/V (KIVI, per-token, int8, fp8) plus
  the full-precision residual, dequantizing in registers.
* `ragged_decode_attention`: per-head regions of a flat pool (Ada-KV budgets, `RaggedKV`).
* `paged_decode_attention`: a page pool read through per-head page tables (`PagedKV`).
* `prefill_attention`, `attention_column_sums`, `window_attention`: the scoring prefill
  (FlashAttention-2 forward with lse, H2O column sums, observation-window attention).

Each layer state picks its kernel (`LayerState.attend_kernel`, `kvjax.states`); `dispatch` holds the
shared fallback rule (`attention_impl="auto"`) and the scoring-prefill entry points.
"""
from kvjax.kernels.decode_attention import decode_attention, decode_attention_reference
from kvjax.kernels.prefill_attention import (attention_column_sums, attention_column_sums_reference,
                                             prefill_attention, prefill_attention_reference, window_attention,
                                             window_attention_reference)
from kvjax.kernels.quant_decode_attention import quant_decode_attention, quant_decode_attention_reference
from kvjax.kernels.paged_decode_attention import paged_decode_attention, paged_decode_attention_reference
from kvjax.kernels.ragged_decode_attention import ragged_decode_attention, ragged_decode_attention_reference

__all__ = ["decode_attention", "decode_attention_reference", "quant_decode_attention",
           "quant_decode_attention_reference", "ragged_decode_attention", "ragged_decode_attention_reference",
           "paged_decode_attention", "paged_decode_attention_reference",
           "prefill_attention", "prefill_attention_reference", "attention_column_sums",
           "attention_column_sums_reference", "window_attention", "window_attention_reference"]
