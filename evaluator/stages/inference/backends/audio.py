"""Audio-LLM families for the hf backend (being built; see the inference issue)."""
from __future__ import annotations

AUDIO_MODEL_TYPES = {"whisper", "qwen2_audio", "qwen2_5_omni", "qwen2_5_omni_thinker", "qwen3_omni_moe",
                     "qwen3_omni_moe_thinker", "gemma3n"}


def is_audio_model(config) -> bool:
    return getattr(config, "model_type", None) in AUDIO_MODEL_TYPES


class AudioRunner:
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("audio models are not supported yet")
