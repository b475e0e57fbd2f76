"""Audio-LLM families for the hf backend: one small adapter per family, one runner for all of them.

| family         | model_type(s)                                  | loaded with                                      | audios | stereo |
|----------------|------------------------------------------------|--------------------------------------------------|--------|--------|
| Whisper        | whisper                                        | AutoModelForSpeechSeq2Seq                        | 1      | no     |
| Qwen2-Audio    | qwen2_audio                                    | AutoModelForMultimodalLM                         | any    | no     |
| Qwen2.5-Omni   | qwen2_5_omni_thinker, qwen2_5_omni (full)      | AutoModelForMultimodalLM; full -> its `.thinker` | any    | no     |
| Qwen3-Omni     | qwen3_omni_moe_thinker, qwen3_omni_moe (full)  | AutoModelForMultimodalLM; full -> its `.thinker` | any    | no     |
| Gemma 3n       | gemma3n                                        | AutoModelForMultimodalLM                         | any    | no     |

Input capabilities (the `audios` and `stereo` columns; AudioFamily.max_audios / .stereo): every family's feature
extractor takes one mono waveform per clip (Whisper's log-mel, Qwen's Whisper-style extractor, Gemma 3n's USM
front end), so none takes stereo. Whisper takes one clip per sample. A sample that asks for more than its family
takes fails alone, with error.type naming what it asked for:
- `MultiAudioUnsupported`: more audio parts than the family's max_audios.
- `StereoUnsupported`: an audio part marked `"spatial": true` (its channels carry the answer, e.g. MMAU-Pro's
  spatial_audio items) with more than one channel, on a family that takes mono only. Mixing it down would
  answer a different question, so it is never done.
Other backends: `openai` sends each file's bytes as they are (channels kept; what the server's model makes of
them is the server's business); `vllm` decodes audio itself, to mono, so it refuses spatial multichannel parts
the same way (check_audio_input with STEREO_KEPT false).

All go through the checkpoint's own AutoProcessor, so the audio placeholder of the chat template is expanded
to the right number of audio positions by the processor, as the model was trained.

- Prompt: decoder-only families render the sample's turns with the processor's chat template (an audio part
  becomes the family's placeholder where it stands; option `chat_template: false`, or a checkpoint without a
  template, joins the turns' parts with newlines, audio parts as the bare placeholder). Several audio parts per
  sample are fed in order. Full Omni checkpoints are loaded with `enable_audio_output=False` and generate with
  the thinker: text out, no talker.
- Whisper-style encoder-decoders take exactly one audio part per sample and ignore the text: they are
  trained audio -> text from the start-of-transcript token, and a free-form instruction fed as a decoder
  prompt would be text the model never saw in that position. Generation options (language=, task=) pass
  through `generation:`.
- Audio: read with soundfile (wav/flac/ogg...), mixed down to mono by averaging channels (only clips not marked
  spatial; each sample's `usage.audio_downmixed` counts its clips that were mixed down), resampled to the
  feature extractor's sampling rate with torchaudio.functional.resample (band-limited sinc interpolation), then
  handed to the processor, which pads/truncates to the family's window (30 s in real checkpoints). An empty
  or unreadable file raises for that sample only (missing files are caught earlier, by the dataset loader).
- Batches are left-padded; usage counts the prompt's tokens as the model sees them (audio positions included;
  for Whisper the encoder's positions per window), the generated tokens up to and including the first end
  token, and the audio's seconds. Whisper, Qwen2-Audio and the Omni processors pad audio features to a fixed
  window, so batching leaves them unchanged; Gemma 3n's feature extractor counts a clip's last frames as valid
  only when the clip is padded in a batch, so its batched outputs can differ slightly from batch_size 1.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..params import GenerationParams
from . import ModelLoadError


@dataclass(frozen=True)
class AudioFamily:
    """What differs between families; everything else is the shared runner."""

    name: str
    seq2seq: bool = False          # Whisper-style: audio -> decoder, no text prompt
    thinker: bool = False          # a full Omni model: generate with model.thinker, talker off
    max_audios: Optional[int] = None  # audio parts a sample may carry (None: any number)
    stereo: bool = False           # takes a clip's channels as they are (no family here does; see the table)
    audio_tokens_per_s: float = 25.0  # for sorting batches by length only
    fixed_audio_tokens: int = 0       # a fixed placeholder count per clip (Gemma 3n: 188)


FAMILIES = {
    "whisper": AudioFamily("whisper", seq2seq=True, max_audios=1),
    "qwen2_audio": AudioFamily("qwen2_audio"),
    "qwen2_5_omni_thinker": AudioFamily("qwen2_5_omni"),
    "qwen2_5_omni": AudioFamily("qwen2_5_omni", thinker=True),
    "qwen3_omni_moe_thinker": AudioFamily("qwen3_omni", audio_tokens_per_s=13.0),
    "qwen3_omni_moe": AudioFamily("qwen3_omni", thinker=True, audio_tokens_per_s=13.0),
    "gemma3n": AudioFamily("gemma3n", fixed_audio_tokens=188),
}
AUDIO_MODEL_TYPES = set(FAMILIES)


class MultiAudioUnsupported(ValueError):
    """A sample has more audio parts than the model takes (its RunResult's error.type)."""


class StereoUnsupported(ValueError):
    """A spatial (channels-carry-the-answer) multichannel clip for a model that takes mono only."""


def audio_channels(path: str) -> int:
    import soundfile
    try:
        return int(soundfile.info(path).channels)
    except (OSError, RuntimeError) as e:
        raise ValueError(f"{path}: cannot read audio: {e}") from None


def spatial_parts(sample) -> list:
    """The paths of the sample's audio parts marked `"spatial": true`."""
    return [p["path"] for m in sample.messages if isinstance(m["content"], list) for p in m["content"]
            if p.get("type") == "audio" and p.get("spatial")]


def check_audio_input(sample, model: str, max_audios: Optional[int], stereo: bool) -> list:
    """The sample's audio paths when `model` can take them (max_audios, stereo); else MultiAudioUnsupported or
    StereoUnsupported naming the sample, the part and the model, for that sample alone."""
    paths = sample.audio_paths()
    if max_audios is not None and len(paths) > max_audios:
        raise MultiAudioUnsupported(f"sample {sample.id!r} has {len(paths)} audio parts; {model} takes at most "
                                    f"{max_audios}")
    if not stereo:
        for path in spatial_parts(sample):
            channels = audio_channels(path)
            if channels > 1:
                raise StereoUnsupported(f"sample {sample.id!r}: {path} is a spatial clip with {channels} channels; "
                                        f"{model} takes mono only, and mixing it down would change the question")
    return paths


def is_audio_model(config) -> bool:
    return getattr(config, "model_type", None) in AUDIO_MODEL_TYPES


def load_audio(path: str, sampling_rate: int):
    """Mono float32 numpy array at `sampling_rate`; raises ValueError naming the file when it cannot."""
    import numpy as np
    import soundfile
    try:
        data, rate = soundfile.read(path, dtype="float32", always_2d=True)
    except (OSError, RuntimeError) as e:  # soundfile.LibsndfileError is a RuntimeError
        raise ValueError(f"{path}: cannot read audio: {e}") from None
    if data.shape[0] == 0:
        raise ValueError(f"{path}: the audio file holds no samples")
    mono = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if rate != sampling_rate:
        import torch
        import torchaudio.functional
        mono = torchaudio.functional.resample(torch.from_numpy(np.ascontiguousarray(mono)), rate,
                                              sampling_rate).numpy()
    return np.ascontiguousarray(mono, dtype=np.float32)


def audio_seconds(path: str) -> float:
    import soundfile
    return float(soundfile.info(path).duration)


class AudioRunner:
    """Loads one audio-LLM checkpoint with its processor; length() and generate() for HFBackend."""

    def __init__(self, path, config, device, dtype, params: GenerationParams, options: dict, seed: int = 0):
        import transformers
        self.family = FAMILIES[config.model_type]
        self.params, self.device, self.dtype = params, device, dtype
        try:
            self.processor = transformers.AutoProcessor.from_pretrained(path)
        except Exception as e:
            raise ModelLoadError(f"cannot load the processor of {path!r} ({self.family.name}): "
                                 f"{type(e).__name__}: {str(e).strip()[:600]}") from None
        self.tokenizer = getattr(self.processor, "tokenizer", None)
        self.feature_extractor = getattr(self.processor, "feature_extractor", None)
        if self.tokenizer is None or self.feature_extractor is None:
            raise ModelLoadError(f"{path}: the processor ({type(self.processor).__name__}) has no tokenizer or no "
                                 "feature extractor; an audio checkpoint needs both (processor_config.json)")
        self.tokenizer.padding_side = "left"
        self.sampling_rate = int(self.feature_extractor.sampling_rate)
        if self.family.seq2seq:
            self.model = transformers.AutoModelForSpeechSeq2Seq.from_pretrained(path, dtype=dtype)
        else:
            if self.family.thinker:
                config.enable_audio_output = False  # the talker (speech out) is neither built nor loaded
            self.model = transformers.AutoModelForMultimodalLM.from_pretrained(path, config=config, dtype=dtype)
        self.model.to(device).eval()
        self.generator = self.model.thinker if self.family.thinker else self.model
        # the processor's template first (it knows the audio parts); some checkpoints keep it with the tokenizer
        self.templater = next((o for o in (self.processor, self.tokenizer) if getattr(o, "chat_template", None)),
                              None)
        self.configure(params, options)
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id
        self.eos_ids = self._eos_ids()
        if not self.family.seq2seq and self.pad_id is None:
            raise ModelLoadError(f"{path}: the tokenizer has neither a pad nor an eos token; cannot batch")

    def configure(self, params: GenerationParams, options: dict) -> None:
        """The generation parameters and prompt options (chat_template) of the next benchmark (reconfigure)."""
        from .text import use_chat_template
        self.params = params
        self.chat = bool(use_chat_template(options) and self.templater is not None)
        self.info = {"audio_family": self.family.name, "sampling_rate": self.sampling_rate,
                     "audio_input": {"max_audios": self.family.max_audios, "stereo": self.family.stereo,
                                     "multichannel": "spatial parts refused (StereoUnsupported); others averaged "
                                                     "to mono, counted in usage.audio_downmixed"},
                     "prompt": ("audio only (text ignored)" if self.family.seq2seq
                                else "chat template" if self.chat else "plain (no chat template)")}

    def _eos_ids(self) -> set:
        ids = set()
        for gen in (self.model.generation_config, getattr(self.generator, "generation_config", None)):
            value = getattr(gen, "eos_token_id", None)
            ids.update(value if isinstance(value, list) else [value] if value is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    # ---- prompts ---------------------------------------------------------------------------------------------
    def _audio_parts(self, sample) -> list:
        paths = check_audio_input(sample, f"a {self.family.name} checkpoint", self.family.max_audios,
                                  self.family.stereo)
        if self.family.seq2seq and not paths:
            raise ValueError(f"sample {sample.id!r} has no audio part; a {self.family.name} checkpoint needs one")
        return paths

    def _placeholder(self) -> str:
        def attr(name):
            return getattr(self.processor, name, None) or getattr(self.tokenizer, name, None)
        if self.family.name == "gemma3n":  # its processor wraps the soft tokens in boa/eoa itself
            return attr("audio_token")
        return f"{attr('audio_bos_token') or ''}{attr('audio_token')}{attr('audio_eos_token') or ''}"

    def prompt(self, sample) -> str:
        if self.family.seq2seq:
            return ""
        if self.chat:
            messages = [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str) else
                         [{"type": "audio"} if p.get("type") == "audio" else {"type": "text", "text": p["text"]}
                          for p in m["content"]]} for m in sample.messages]
            return self.templater.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        turns = []
        for m in sample.messages:
            parts = [m["content"]] if isinstance(m["content"], str) else \
                [self._placeholder() if p.get("type") == "audio" else p["text"] for p in m["content"]]
            turns.append("\n".join(parts))
        return "\n".join(turns)

    def length(self, sample) -> int:
        """An estimate of the prompt's length for sorting batches (never raises)."""
        try:
            seconds = sum(audio_seconds(p) for p in sample.audio_paths())
            n_audio = len(sample.audio_paths())
            text = len(self.tokenizer(self.prompt(sample), add_special_tokens=False)["input_ids"])
        except Exception:
            return 0  # the error surfaces (for this sample) when its batch runs
        if self.family.fixed_audio_tokens:
            return text + n_audio * self.family.fixed_audio_tokens
        return text + int(seconds * self.family.audio_tokens_per_s)

    # ---- generation ------------------------------------------------------------------------------------------
    def _generation_kwargs(self) -> dict:
        kwargs = dict(max_new_tokens=self.params.max_new_tokens)
        if self.pad_id is not None:
            kwargs["pad_token_id"] = self.pad_id
        if not self.family.seq2seq and self.eos_ids:
            kwargs["eos_token_id"] = sorted(self.eos_ids)
        if self.params.greedy:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(do_sample=True, temperature=self.params.temperature, top_p=self.params.top_p)
        kwargs.update(self.params.extra)
        return kwargs

    def _cut(self, row: list) -> tuple[list, int]:
        """Generated ids up to and including the first end token; (ids, count)."""
        for k, tok in enumerate(row):
            if tok in self.eos_ids:
                return row[:k + 1], k + 1
        return row, len(row)

    def generate(self, samples) -> list:
        import torch
        parts = [self._audio_parts(s) for s in samples]
        downmixed = [sum(audio_channels(p) > 1 for p in paths) for paths in parts]
        per_sample = [[load_audio(p, self.sampling_rate) for p in paths] for paths in parts]
        clips = [clip for sample_clips in per_sample for clip in sample_clips]
        seconds = [sum(len(c) for c in sample_clips) / self.sampling_rate for sample_clips in per_sample]
        kwargs = self._generation_kwargs()
        if self.family.seq2seq:
            inputs = self.feature_extractor(clips, sampling_rate=self.sampling_rate, return_tensors="pt")
            inputs = inputs.to(self.device, dtype=self.dtype)
            with torch.inference_mode():
                out = self.model.generate(input_features=inputs["input_features"], **kwargs)
            sequences = out.sequences if hasattr(out, "sequences") else out
            audio_positions = int(self.model.config.max_source_positions)  # the encoder's output per window
            rows = [(self._strip_decoder_prompt(row), audio_positions) for row in sequences.tolist()]
        else:
            prompts = [self.prompt(s) for s in samples]
            audio = {"audio": clips, "sampling_rate": self.sampling_rate} if clips else {}
            # a rendered chat template already holds the special tokens (Gemma's <bos>): add none twice
            inputs = self.processor(text=prompts, return_tensors="pt", padding=True,
                                    add_special_tokens=not self.chat, **audio)
            inputs = inputs.to(self.device, dtype=self.dtype)
            with torch.inference_mode():
                out = self.generator.generate(**inputs, **kwargs)
            sequences = out.sequences if hasattr(out, "sequences") else out
            width = inputs["input_ids"].shape[1]
            rows = [(row[width:], int(sum(mask))) for row, mask in
                    zip(sequences.tolist(), inputs["attention_mask"].tolist())]
        results = []
        for (row, prompt_tokens), secs, mixed in zip(rows, seconds, downmixed):
            row, n = self._cut(row)
            text = self.tokenizer.decode(row, skip_special_tokens=True)
            results.append((text, {"prompt_tokens": prompt_tokens, "completion_tokens": n,
                                   "total_tokens": prompt_tokens + n, "audio_seconds": round(secs, 3),
                                   "audio_downmixed": mixed}))
        return results

    def _strip_decoder_prompt(self, row: list) -> list:
        """Whisper's generate() may return its forced decoder prefix (start of transcript, language, task,
        no-timestamps) before the text: leading special tokens that are not an end token."""
        special = set(self.tokenizer.all_special_ids) - self.eos_ids
        n = 0
        while n < len(row) and row[n] in special:
            n += 1
        return row[n:]
