"""Random-initialised model presets: no download, shapes of real models."""
from __future__ import annotations

from engine.model_config import ModelConfig

PRESETS: dict[str, dict] = {
    # about 0.1 M parameters: ready in well under a second on a CPU
    "tiny-llama": dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=4096),
    "tiny-qwen3": dict(model_type="qwen3", vocab_size=512, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                       qk_norm=True, rope_theta=1e6, max_position_embeddings=4096),
    "qwen3-0.6b": dict(model_type="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                       num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                       qk_norm=True, rope_theta=1e6, tie_word_embeddings=True,
                       max_position_embeddings=40960, bos_token_id=None, eos_token_id=[151645]),
    "llama3-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=131072,
                      rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                        high_freq_factor=4.0, original_max_position_embeddings=8192),
                      bos_token_id=128000, eos_token_id=[128001, 128009]),
    # Yi-34B's shape (a 34B-class model, the one vAttention serves at TP=2): 68.8 GB of bf16 weights
    # and 240 KiB of KV per token. A full pool (128 sequences x 4096 tokens: 128 GB of KV) does not
    # fit one H200 beside the weights; at TP=2 each GPU holds 34 GB of weights and 64 GB of KV
    "yi-34b": dict(model_type="llama", vocab_size=64000, hidden_size=7168, intermediate_size=20480,
                   num_hidden_layers=60, num_attention_heads=56, num_key_value_heads=8, rms_norm_eps=1e-5,
                   rope_theta=5000000.0, max_position_embeddings=4096, bos_token_id=1, eos_token_id=[2]),
    # Gemma-2-9B's KV shape as a Llama-architecture model (no soft-capping or extra norms: random
    # weights serve memory and time studies): 42 layers alternating local (4096-token window) and
    # global attention, 8 KV heads of 256, so a token costs 336 KiB of bf16 KV over all layers
    "gemma2-9b-like": dict(model_type="llama", vocab_size=256000, hidden_size=3584, intermediate_size=14336,
                           num_hidden_layers=42, num_attention_heads=16, num_key_value_heads=8, head_dim=256,
                           rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=8192,
                           sliding_window=4096, layer_types=["sliding_attention", "full_attention"] * 21,
                           tie_word_embeddings=True, bos_token_id=2, eos_token_id=[1]),
    # Gemma-3-27B's KV shape, likewise: 62 layers, every sixth global (10 global, 52 local with a
    # 1024-token window). Equal-size layer groups (vLLM's hybrid allocator) of 10 leave the last
    # local group 8 layers short: the padding that approach costs
    "gemma3-27b-like": dict(model_type="llama", vocab_size=262208, hidden_size=5376, intermediate_size=21504,
                            num_hidden_layers=62, num_attention_heads=32, num_key_value_heads=16, head_dim=128,
                            rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=131072,
                            sliding_window=1024,
                            layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                                         for i in range(62)],
                            tie_word_embeddings=True, bos_token_id=2, eos_token_id=[1]),
}


def preset_config(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(
            f"unknown model '{name}': use a preset {sorted(PRESETS)} or a local HF directory "
            "with config.json and *.safetensors"
        )
    return ModelConfig(name=name, **PRESETS[name])
