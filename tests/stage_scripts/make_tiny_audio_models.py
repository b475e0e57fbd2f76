"""Build a tiny random audio-LLM checkpoint offline (run in .venvs/inference).

    python make_tiny_audio_models.py OUT FAMILY      FAMILY: whisper | qwen2_audio | qwen2_5_omni |
                                                             qwen3_omni | qwen3_omni_full | gemma3n | all
    (all: one checkpoint per family under OUT/<family>, one python start-up for all of them)

Each checkpoint is what a real one holds: config.json + model.safetensors + generation_config.json, a
tokenizer trained here with `tokenizers` (no hub) and the family's processor (feature extractor, chat template)
saved alongside, so AutoConfig / AutoProcessor / AutoModelFor* load it like a downloaded model. Weights are
random: outputs are gibberish. The numbers below are the constraints the model code checks:

- Whisper-style encoders (Whisper, Qwen2-Audio) need exactly 2 x max_source_positions mel frames: a 3 s
  feature window (chunk_length=3, 300 frames) goes with max_source_positions=150.
- The audio placeholder ids in the config (audio_token_index / audio_token_id, start/end ids) are the
  tokenizer's ids for the same tokens; the processor expands one placeholder into N audio positions.
- Qwen-Omni text models use M-RoPE: mrope_section sums to head_dim / 2 (hidden 32 / 2 heads -> 16 / 2 = 8).
- Gemma 3n's vocab is laid out as text [0, 512), vision soft tokens [512, 640), audio soft tokens [640, 768);
  the processor's audio_seq_length equals the config's audio_soft_tokens_per_image (188); its vision tower
  is a timm MobileNetV5 built even for audio-only use, shrunk with channel_multiplier 0.05.
"""
import argparse
import json
import os
import shutil

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

FAMILIES = ("whisper", "qwen2_audio", "qwen2_5_omni", "qwen3_omni", "qwen3_omni_full", "gemma3n")

CORPUS = [
    "a dog barks in the distance", "rain falls on a metal roof", "a high pitched beep", "a low steady hum",
    "white noise and static", "someone claps twice", "birds sing in the morning", "a car passes by quickly",
    "What do you hear in this audio?", "Describe the sound.", "Transcribe the audio.", "Answer with one word.",
    "You are a helpful assistant.", "system", "user", "assistant", "model", "yes no maybe", "(A) (B) (C) (D)",
    "0 1 2 3 4 5 6 7 8 9", "the of and to in is it that for on with as a an",
]

# Qwen-style chat template: the audio placeholder goes where the audio part is; the processor expands it.
QWEN_CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
             "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
             "{% if c['type'] == 'audio' %}AUDIO_PART{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
             "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
             "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
GEMMA_CHAT = ("{{ bos_token }}{% for m in messages %}<start_of_turn>"
              "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
              "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
              "{% if c['type'] == 'audio' %}<audio_soft_token>{% elif c['type'] == 'text' %}{{ c['text'] }}"
              "{% endif %}{% endfor %}{% endif %}<end_of_turn>\n{% endfor %}"
              "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
H = 32  # text hidden size: 2 heads x head_dim 16


def byte_level_bpe(vocab_size=500):
    """(vocab, merges) of a byte-level BPE trained on CORPUS; special tokens are added by the tokenizer class."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS * 20, trainer=trainer)
    data = json.loads(tok.to_str())
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in data["model"]["merges"]]
    return data["model"]["vocab"], merges


def build_whisper(out):
    from transformers import (GenerationConfig, WhisperConfig, WhisperFeatureExtractor,
                              WhisperForConditionalGeneration, WhisperProcessor, WhisperTokenizer)
    vocab, merges = byte_level_bpe()
    specials = ["<|endoftext|>", "<|startoftranscript|>", "<|translate|>", "<|transcribe|>", "<|notimestamps|>"]
    tok = WhisperTokenizer(vocab=vocab, merges=merges, extra_special_tokens=specials, pad_token="<|endoftext|>")
    ids = {s: tok.convert_tokens_to_ids(s) for s in specials}
    processor = WhisperProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=80, chunk_length=3),
                                 tokenizer=tok)
    config = WhisperConfig(
        vocab_size=len(tok), num_mel_bins=80, d_model=32, encoder_layers=1, decoder_layers=2,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
        max_source_positions=150, max_target_positions=64, pad_token_id=ids["<|endoftext|>"],
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|endoftext|>"],
        decoder_start_token_id=ids["<|startoftranscript|>"], begin_suppress_tokens=None, suppress_tokens=None)
    model = WhisperForConditionalGeneration(config)
    gen = GenerationConfig.from_model_config(config)
    gen.no_timestamps_token_id = ids["<|notimestamps|>"]
    gen.is_multilingual = False  # no language tokens in this vocab: generate() must not look for them
    gen.max_length = 64
    model.generation_config = gen
    return model, processor


def qwen_tokenizer(audio, audio_bos, audio_eos, image, video, vision_bos, vision_eos):
    from transformers import Qwen2Tokenizer
    vocab, merges = byte_level_bpe()
    return Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, eos_token="<|im_end|>",
                          pad_token="<|endoftext|>", audio_token=audio, audio_bos_token=audio_bos,
                          audio_eos_token=audio_eos, image_token=image, video_token=video,
                          vision_bos_token=vision_bos, vision_eos_token=vision_eos,
                          extra_special_tokens=["<|im_start|>", "<|tts_bos|>", "<|tts_eos|>", "<|tts_pad|>"],
                          padding_side="left")


def text_config(tok, **extra):
    return dict(vocab_size=len(tok), hidden_size=H, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **extra)


def build_qwen2_audio(out):
    from transformers import (Qwen2AudioConfig, Qwen2AudioForConditionalGeneration, Qwen2AudioProcessor,
                              WhisperFeatureExtractor)
    tok = qwen_tokenizer("<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>", "<|IMAGE|>", "<|VIDEO|>",
                         "<|vision_bos|>", "<|vision_eos|>")
    processor = Qwen2AudioProcessor(
        feature_extractor=WhisperFeatureExtractor(feature_size=128, chunk_length=3), tokenizer=tok,
        chat_template=QWEN_CHAT.replace("AUDIO_PART", "<|audio_bos|><|AUDIO|><|audio_eos|>"))
    config = Qwen2AudioConfig(
        audio_config=dict(d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64,
                          num_mel_bins=128, max_source_positions=150),
        text_config=dict(model_type="qwen2", **text_config(tok)), audio_token_index=tok.audio_token_id)
    return Qwen2AudioForConditionalGeneration(config), processor


def omni_thinker_config(tok, tid, qwen3: bool) -> dict:
    rope = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}  # sums to head_dim/2 = 8
    if qwen3:
        return dict(
            audio_config=dict(d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64,
                              num_mel_bins=128, downsample_hidden_size=32, n_window=50, n_window_infer=100,
                              output_dim=H),
            vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=H,
                               patch_size=16, deepstack_visual_indexes=[0]),
            text_config=text_config(tok, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                                    rope_parameters={**rope, "interleaved": True}),
            audio_token_id=tok.audio_token_id, image_token_id=tok.image_token_id, video_token_id=tok.video_token_id,
            audio_start_token_id=tid("<|audio_start|>"), audio_end_token_id=tid("<|audio_end|>"),
            vision_start_token_id=tid("<|vision_start|>"), vision_end_token_id=tid("<|vision_end|>"),
            user_token_id=tid("user"), position_id_per_seconds=13)
    return dict(
        audio_config=dict(d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64,
                          num_mel_bins=128, output_dim=H, n_window=100),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=H,
                           fullatt_block_indexes=[0]),
        text_config=text_config(tok, rope_parameters=rope),
        audio_token_index=tok.audio_token_id, image_token_index=tok.image_token_id,
        video_token_index=tok.video_token_id, audio_start_token_id=tid("<|audio_bos|>"),
        audio_end_token_id=tid("<|audio_eos|>"), vision_start_token_id=tid("<|vision_bos|>"),
        vision_end_token_id=tid("<|vision_eos|>"), user_token_id=tid("user"))


def build_qwen2_5_omni(out):
    """The thinker alone (model_type qwen2_5_omni_thinker): text out, no talker."""
    from transformers import (Qwen2_5OmniProcessor, Qwen2_5OmniThinkerConfig,
                              Qwen2_5OmniThinkerForConditionalGeneration, Qwen2VLImageProcessor,
                              Qwen2VLVideoProcessor, WhisperFeatureExtractor)
    tok = qwen_tokenizer("<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>", "<|IMAGE|>", "<|VIDEO|>",
                         "<|vision_bos|>", "<|vision_eos|>")
    processor = Qwen2_5OmniProcessor(
        image_processor=Qwen2VLImageProcessor(), video_processor=Qwen2VLVideoProcessor(),
        feature_extractor=WhisperFeatureExtractor(feature_size=128), tokenizer=tok,
        chat_template=QWEN_CHAT.replace("AUDIO_PART", "<|audio_bos|><|AUDIO|><|audio_eos|>"))
    config = Qwen2_5OmniThinkerConfig(**omni_thinker_config(tok, tok.convert_tokens_to_ids, qwen3=False))
    return Qwen2_5OmniThinkerForConditionalGeneration(config), processor


def build_qwen3_omni(out, full: bool = False):
    """The thinker alone, or (full) the whole Qwen3OmniMoeForConditionalGeneration without its talker, the
    layout of the hub checkpoints."""
    from transformers import (Qwen2VLImageProcessor, Qwen2VLVideoProcessor, Qwen3OmniMoeConfig,
                              Qwen3OmniMoeForConditionalGeneration, Qwen3OmniMoeProcessor,
                              Qwen3OmniMoeThinkerConfig, Qwen3OmniMoeThinkerForConditionalGeneration,
                              WhisperFeatureExtractor)
    tok = qwen_tokenizer("<|audio_pad|>", "<|audio_start|>", "<|audio_end|>", "<|image_pad|>", "<|video_pad|>",
                         "<|vision_start|>", "<|vision_end|>")
    tid = tok.convert_tokens_to_ids
    processor = Qwen3OmniMoeProcessor(
        image_processor=Qwen2VLImageProcessor(patch_size=16), video_processor=Qwen2VLVideoProcessor(patch_size=16),
        feature_extractor=WhisperFeatureExtractor(feature_size=128), tokenizer=tok,
        chat_template=QWEN_CHAT.replace("AUDIO_PART", "<|audio_start|><|audio_pad|><|audio_end|>"))
    thinker = omni_thinker_config(tok, tid, qwen3=True)
    missing = [w for w in ("system", "user", "assistant") if tok.convert_tokens_to_ids(w) in (None, tok.unk_token_id)]
    assert not missing, f"role words must be single tokens of the trained vocab: {missing}"
    if not full:
        return Qwen3OmniMoeThinkerForConditionalGeneration(Qwen3OmniMoeThinkerConfig(**thinker)), processor
    # the full model's ids must each be a single token of this vocab
    config = Qwen3OmniMoeConfig(thinker_config=thinker, enable_audio_output=False,
                                im_start_token_id=tid("<|im_start|>"), im_end_token_id=tid("<|im_end|>"),
                                tts_pad_token_id=tid("<|tts_pad|>"), tts_bos_token_id=tid("<|tts_bos|>"),
                                tts_eos_token_id=tid("<|tts_eos|>"), system_token_id=tid("system"),
                                user_token_id=tid("user"), assistant_token_id=tid("assistant"))
    return Qwen3OmniMoeForConditionalGeneration(config), processor


GEMMA_TEXT_V, GEMMA_MM_V = 512, 128  # text ids [0, 512), vision [512, 640), audio [640, 768)


def gemma_vocab():
    """SentencePiece-style BPE (byte fallback, '▁' for a space) in Gemma 3n's vocab layout."""
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>",
                "<start_of_image>", "<start_of_audio>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous")
    tok.train_from_iterator(CORPUS * 20, trainers.BpeTrainer(vocab_size=GEMMA_TEXT_V, special_tokens=specials,
                                                             show_progress=False))
    data = json.loads(tok.to_str())
    vocab, merges = data["model"]["vocab"], [tuple(m) for m in data["model"]["merges"]]
    assert len(vocab) <= GEMMA_TEXT_V, len(vocab)
    for i in range(len(vocab), GEMMA_TEXT_V):
        vocab[f"<unused{i}>"] = i
    named = {GEMMA_TEXT_V: "<end_of_image>", GEMMA_TEXT_V + 1: "<image_soft_token>",
             GEMMA_TEXT_V + GEMMA_MM_V: "<end_of_audio>", GEMMA_TEXT_V + GEMMA_MM_V + 1: "<audio_soft_token>"}
    for i in range(GEMMA_TEXT_V, GEMMA_TEXT_V + 2 * GEMMA_MM_V):
        vocab[named.get(i, f"<unused{i}>")] = i
    return vocab, merges


def build_gemma3n(out):
    from transformers import (Gemma3nAudioFeatureExtractor, Gemma3nConfig, Gemma3nForConditionalGeneration,
                              Gemma3nProcessor, GemmaTokenizer, GenerationConfig, SiglipImageProcessor)
    vocab, merges = gemma_vocab()
    tok = GemmaTokenizer(vocab=vocab, merges=merges, image_token="<image_soft_token>", boi_token="<start_of_image>",
                         eoi_token="<end_of_image>", audio_token="<audio_soft_token>", boa_token="<start_of_audio>",
                         eoa_token="<end_of_audio>", extra_special_tokens=["<start_of_turn>", "<end_of_turn>"])
    tid = tok.convert_tokens_to_ids
    assert tok.audio_token_id == GEMMA_TEXT_V + GEMMA_MM_V + 1, tok.audio_token_id
    processor = Gemma3nProcessor(feature_extractor=Gemma3nAudioFeatureExtractor(),
                                 image_processor=SiglipImageProcessor(size={"height": 768, "width": 768}),
                                 tokenizer=tok, chat_template=GEMMA_CHAT, audio_seq_length=188, image_seq_length=256)
    layers = 4
    eos = [tid("<eos>"), tid("<end_of_turn>")]
    config = Gemma3nConfig(
        text_config=dict(vocab_size=GEMMA_TEXT_V + 2 * GEMMA_MM_V, vocab_size_per_layer_input=GEMMA_TEXT_V,
                         hidden_size=H, hidden_size_per_layer_input=8, intermediate_size=64,
                         num_hidden_layers=layers, num_kv_shared_layers=2,
                         layer_types=["sliding_attention", "full_attention"] * (layers // 2),
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, altup_num_inputs=2,
                         laurel_rank=8, activation_sparsity_pattern=[0.0] * layers, sliding_window=64,
                         max_position_embeddings=1024, pad_token_id=tid("<pad>"), bos_token_id=tid("<bos>"),
                         eos_token_id=eos),
        audio_config=dict(input_feat_size=128, hidden_size=32, conf_num_attention_heads=2, conf_num_hidden_layers=1,
                          sscp_conv_channel_size=[16, 8], conf_conv_kernel_size=3, conf_attention_chunk_size=4,
                          conf_attention_context_left=5, vocab_size=GEMMA_MM_V,
                          vocab_offset=GEMMA_TEXT_V + GEMMA_MM_V),
        vision_config=dict(architecture="mobilenetv5_300m_enc", model_args={"channel_multiplier": 0.05},
                           hidden_size=2048, vocab_size=GEMMA_MM_V, vocab_offset=GEMMA_TEXT_V),
        audio_soft_tokens_per_image=188, vision_soft_tokens_per_image=256,
        boi_token_id=tid("<start_of_image>"), eoi_token_id=tid("<end_of_image>"), image_token_id=tok.image_token_id,
        boa_token_id=tid("<start_of_audio>"), eoa_token_id=tid("<end_of_audio>"), audio_token_id=tok.audio_token_id)
    model = Gemma3nForConditionalGeneration(config)
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=tid("<pad>"), bos_token_id=tid("<bos>"))
    return model, processor


BUILDERS = {
    "whisper": build_whisper, "qwen2_audio": build_qwen2_audio, "qwen2_5_omni": build_qwen2_5_omni,
    "qwen3_omni": build_qwen3_omni, "qwen3_omni_full": lambda out: build_qwen3_omni(out, full=True),
    "gemma3n": build_gemma3n,
}


def build(out: str, family: str, seed: int = 0) -> dict:
    from transformers import GenerationConfig
    torch.manual_seed(seed)
    model, processor = BUILDERS[family](out)
    tok = processor.tokenizer
    if family not in ("whisper", "gemma3n"):
        model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model.eval()
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    for name in os.listdir(out):  # save_pretrained can leave 0600 files; a daemon of another user must read them
        os.chmod(os.path.join(out, name), 0o644)
    return {"out": out, "family": family, "model_type": model.config.model_type,
            "params": sum(p.numel() for p in model.parameters())}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("family", choices=FAMILIES + ("all",))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.family == "all":
        for family in FAMILIES:
            print(json.dumps(build(os.path.join(args.out, family), family, args.seed)), flush=True)
    else:
        print(json.dumps(build(args.out, args.family, args.seed)))


if __name__ == "__main__":
    main()
