"""One forward pass at the largest batch the scheduler may form, to measure peak activations."""
from __future__ import annotations

import torch

from kernels.metadata import Addressing, AttentionMetadata


@torch.inference_mode()
def peak_activation_bytes(engine) -> int:
    cfg, mc = engine.config, engine.model_config
    n = min(cfg.max_num_batched_tokens, engine.max_model_len)
    dev = engine.device
    # a scratch cache of n slots per layer, subtracted from the peak afterwards
    caches = [(torch.empty(n, mc.num_key_value_heads, mc.head_dim, dtype=engine.dtype, device=dev),
               torch.empty(n, mc.num_key_value_heads, mc.head_dim, dtype=engine.dtype, device=dev))
              for _ in range(mc.num_hidden_layers)]
    scratch = sum(k.numel() * k.element_size() * 2 for k, _ in caches)
    meta = AttentionMetadata(
        mode=Addressing.LINEAR,
        query_start_loc=torch.tensor([0, n], dtype=torch.int32, device=dev),
        seq_lens=torch.tensor([n], dtype=torch.int32, device=dev),
        max_query_len=n, max_seq_len=n,
        slot_mapping=torch.arange(n, dtype=torch.int64, device=dev),
        seq_base=torch.zeros(1, dtype=torch.int64, device=dev),
    )
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    ids = torch.zeros(n, dtype=torch.int64, device=dev)
    pos = torch.arange(n, dtype=torch.int64, device=dev)
    hidden = engine.model(ids, pos, meta, caches)
    # sampling touches the logits of up to max_num_seqs rows
    rows = min(cfg.max_num_seqs, n)
    engine.model.compute_logits(hidden[:rows]).float().softmax(-1)  # as a sampling step widens them
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del caches, hidden
    torch.cuda.empty_cache()
    return max(peak - scratch, 0) + scratch // 8  # headroom for allocator slack
