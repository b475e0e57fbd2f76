"""Text LMs for the hf backend: `TextRunner` (a causal or seq2seq LM with its tokenizer: prompts, the shared-prefix
key/value cache, generation, loglikelihood choice scoring) and the helpers of that path (option rules, ChoiceRequest,
pack). hf.py's docstring describes what they do; HFBackend picks this runner for every checkpoint that is not an
audio-LLM (audio.AudioRunner). text_of and use_chat_template serve vllm.py and audio.py too.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Optional

from ...common import option_on
from ..params import GenerationParams
from . import ModelLoadError


def text_of(content) -> str:
    if isinstance(content, str):
        return content
    return "\n".join(p["text"] for p in content if p.get("type") == "text")


def has_audio(messages) -> bool:
    return any(isinstance(m["content"], list) and any(p.get("type") == "audio" for p in m["content"])
               for m in messages)


def use_chat_template(options: dict) -> bool:
    """Option `chat_template` (default on): false/"false"/"no"/0 turn the checkpoint's template off."""
    return option_on(options, "chat_template")


def use_shared_prefix(options: dict) -> bool:
    """Option `shared_prefix` (default on): false/"false"/"no"/0 run every row of a batch from its first token."""
    return option_on(options, "shared_prefix")


def shared_prefix_length(rows: list) -> int:
    """How many leading tokens all `rows` (token id sequences) have in common, leaving each row at least one token
    of its own (the forward after the shared part needs an input in every row); 0 for fewer than two rows."""
    if len(rows) < 2:
        return 0
    first, limit = rows[0], min(len(r) for r in rows) - 1
    n = 0
    while n < limit and all(r[n] == first[n] for r in rows):
        n += 1
    return n


def target_delimiter(options: dict, chat: bool) -> str:
    """What precedes each choice in loglikelihood scoring: option `target_delimiter` when set, else lm-eval 0.4.10's
    rule: " " after a plain prompt, nothing after a chat-template prompt (its generation prompt ends the context)."""
    value = options.get("target_delimiter")
    if value is None:
        return "" if chat else " "
    if not isinstance(value, str):
        raise ModelLoadError(f"backend_options.target_delimiter: expected a string (e.g. \" \" or \"\"), got {value!r}")
    return value


# The rule chat-template loglikelihood scoring follows when no target_delimiter is set, versioned: results made under
# another rule must not share a curve. evaluator/daemon/fingerprint.py puts it in the settings of the benchmarks it
# applies to (chat_choice_rule), so no other benchmark's fingerprint moves. Until 2026-11-30 it was " <choice>".
CHAT_CHOICE_RULE = "lm-eval-0.4.10 (choice without target delimiter)"


def chat_choice_rule(options: dict) -> Optional[str]:
    """CHAT_CHOICE_RULE for a benchmark whose numbers depend on it: loglikelihood choice scoring with the chat template
    not turned off and no target_delimiter of its own; None otherwise. (Whether the checkpoint has a template at all is
    not known before it loads, so a template-less checkpoint with these options carries the rule too.)"""
    if options.get("choice_scoring") != "loglikelihood" or not use_chat_template(options) \
            or options.get("target_delimiter") is not None:
        return None
    return CHAT_CHOICE_RULE


def log_softmax(logits):
    """Log-probabilities in float32 at least: half-precision logits are upcast, float64 ones stay float64, so a model
    loaded with `dtype: float64` is scored in float64 throughout (as lm-evaluation-harness scores it)."""
    import torch
    return torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


def pack(order: list, size, limit: int) -> list:
    """Consecutive batches of `order` whose size(i) sum to at most `limit` (one item alone may exceed it)."""
    batches, batch, total = [], [], 0
    for i in order:
        if batch and total + size(i) > limit:
            batches.append(batch)
            batch, total = [], 0
        batch.append(i)
        total += size(i)
    if batch:
        batches.append(batch)
    return batches


@dataclass(frozen=True)
class ChoiceRequest:
    """One question's loglikelihood requests as tokens: the context (never empty) and each choice's continuation."""

    context: tuple
    continuations: tuple

    @property
    def rows(self) -> int:
        return len(self.continuations)

    def sort_key(self) -> tuple:
        # longest context first (contexts share a left-padded forward), then longest continuation
        return -len(self.context), -max((len(c) for c in self.continuations), default=0)


class TextRunner:
    """Causal or seq2seq text LM with its tokenizer."""

    def __init__(self, path, config, device, dtype, params: GenerationParams, options: dict):
        import transformers
        self.device = device
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        if len(self.tokenizer) <= 1:  # transformers 5 builds an empty tokenizer from a folder with none saved
            from evaluator.stages.checkpoint_compat import CheckpointFormatError
            raise CheckpointFormatError(
                f"{path}: no tokenizer saved with the checkpoint (the one transformers built from the folder has "
                f"{len(self.tokenizer)} token(s); every prompt would be empty); save it beside config.json "
                f"(tokenizer.save_pretrained, or pass processing_class= to the Trainer)")
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            if self.tokenizer.eos_token is None:
                raise ModelLoadError(f"{path}: the tokenizer has neither a pad nor an eos token; cannot batch")
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.seq2seq = bool(getattr(config, "is_encoder_decoder", False))
        cls = transformers.AutoModelForSeq2SeqLM if self.seq2seq else transformers.AutoModelForCausalLM
        self.model = cls.from_pretrained(path, dtype=dtype).to(device).eval()
        # the positions the model has (None: not stated): a longer input is refused per sample, as vLLM refuses a
        # request over max_model_len; GPT-2 would fail with IndexError, a RoPE model would run out of its range
        self.context = next((int(v) for k in ("max_position_embeddings", "n_positions", "n_ctx")
                             if isinstance(v := getattr(config, k, None), int) and v > 0), None)
        self.configure(params, options)
        self.eos_ids = self._eos_ids()
        self.prefix_memo = None  # (tokens, key/value cache) of the last shared prefix: prefix_cache

    def configure(self, params: GenerationParams, options: dict) -> None:
        """The generation parameters and prompt options (chat_template) of the next benchmark."""
        self.params = params
        self.chat = bool(use_chat_template(options) and getattr(self.tokenizer, "chat_template", None))
        self.target_delimiter = target_delimiter(options, self.chat)
        self.share = use_shared_prefix(options) and self.prefix_cacheable()

    def prefix_cacheable(self) -> bool:
        """Whether a key/value cache of a shared prompt prefix can be computed once and copied to every row: decoder
        -only models without sliding-window attention (a window would have to be cut per row)."""
        config = self.model.config
        sliding = getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)
        # a checkpoint asking generate() for its own cache kind (static, hybrid, ...) would refuse a prebuilt one
        own_cache = getattr(self.model.generation_config, "cache_implementation", None) not in (None, "dynamic")
        return not self.seq2seq and not sliding and not own_cache

    def forget_prefix(self) -> None:
        """Drop the remembered prefix cache: at every benchmark's start (its numbers depend on it alone) and before
        the weights change (HFBackend.swap)."""
        self.prefix_memo = None

    def prefix_cache(self, prefix: tuple):
        """The key/value cache of `prefix` in one row. Batches of one benchmark mostly start alike (the same template
        and instruction): the part in common with the last batch's prefix is copied from its cache, and only the
        tokens after it go through the model."""
        import copy
        import torch
        known, kept = self.prefix_memo or ((), None)
        common = 0
        while common < min(len(known), len(prefix)) and known[common] == prefix[common]:
            common += 1
        cache = None
        if common:
            cache = copy.deepcopy(kept)
            if common < len(known):  # a negative count removes that many tokens (transformers 4.x and 5.x alike)
                cache.crop(common - len(known))
        if common < len(prefix):
            with torch.inference_mode():
                cache = self.model(input_ids=torch.tensor([prefix[common:]], device=self.device),
                                   position_ids=torch.arange(common, len(prefix), device=self.device)[None],
                                   past_key_values=cache, use_cache=True, logits_to_keep=1).past_key_values
        if not all(hasattr(cache, f) for f in ("crop", "batch_repeat_interleave")):
            print(f"[inference] shared_prefix: off for this model (its {type(cache).__name__} cannot be copied to "
                  "every row)", file=sys.stderr, flush=True)
            return None
        self.prefix_memo = (prefix, copy.deepcopy(cache))
        return cache

    def batch_layout(self, rows: list, share: bool):
        """A batch of token id rows as the model reads it: (ids, mask, p, cache).

        With p > 0 the first p tokens are every row's own shared prefix: it is run once, in one row (prefix_cache),
        and its key/value cache (repeated for every row) is returned; each row continues after it, left-padded to
        the batch's widest (the padding masked out, positions counted on from p, so every row is what it is alone).
        With p = 0 (one row, nothing shared, sharing off): plain left padding and no cache."""
        import torch
        p = shared_prefix_length(rows) if share else 0
        pad = self.tokenizer.pad_token_id
        width = p + max(len(r) - p for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        ids[:, :p] = torch.tensor(rows[0][:p], dtype=torch.long)
        mask[:, :p] = 1
        for q, r in enumerate(rows):
            ids[q, width - (len(r) - p):] = torch.tensor(r[p:], dtype=torch.long)
            mask[q, width - (len(r) - p):] = 1
        cache = self.prefix_cache(tuple(rows[0][:p])) if p else None
        if cache is not None:
            cache.batch_repeat_interleave(len(rows))
        elif p:  # this model's cache cannot be copied to every row: the batch runs whole, and so do the next ones
            self.share = False
            return self.batch_layout(rows, False)
        return ids, mask, p, cache

    def _eos_ids(self) -> set:
        ids = self.model.generation_config.eos_token_id
        ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    def read_generation_config(self, path: str) -> None:
        """The checkpoint's generation_config.json (or the one its config implies), as from_pretrained reads it."""
        import transformers
        if os.path.isfile(os.path.join(path, "generation_config.json")):
            self.model.generation_config = transformers.GenerationConfig.from_pretrained(path)
        else:  # as from_pretrained does (GenerationMixin.adjust_generation_fn): the generation fields of config.json
            # itself (e.g. a legacy repetition_penalty), which the loaded model's config no longer holds
            self.model.generation_config = transformers.GenerationConfig.from_pretrained(
                path, config_file_name="config.json", _from_model_config=True)
        self.eos_ids = self._eos_ids()

    def copy_plan(self, checkpoint: dict) -> Optional[list]:
        """[(checkpoint key, model tensor, [other keys])] that loads `checkpoint` ({key: (shape, dtype, file)})
        strictly: every model tensor from exactly one key of the same shape, nothing left over; None when it does
        not fit. Tied tensors (lm_head sharing the embedding) are one tensor: the checkpoint holds it under one of
        their names (save_pretrained keeps one) or under several; then the first in the model's order is copied
        and the other keys are listed, for the caller to check they hold the same values (a fresh load unties
        tensors whose values differ: copying one of them would silently drop the other)."""
        groups: dict = {}  # storage -> the model's names for that tensor, in model order
        tensors = {}
        for name, tensor in self.model.state_dict(keep_vars=True).items():
            key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
            groups.setdefault(key, []).append(name)
            tensors[name] = tensor
        plan, used = [], set()
        for names in groups.values():
            present = [n for n in names if n in checkpoint]
            if not present:
                return None
            used.update(present)
            name = present[0]
            if any(tuple(checkpoint[n][0]) != tuple(tensors[name].shape) for n in present):
                return None
            plan.append((name, tensors[name], present[1:]))
        if set(checkpoint) - used:
            return None
        return plan

    def prompt(self, sample) -> str:
        if has_audio(sample.messages):
            raise ValueError(f"sample {sample.id!r} has audio input but this checkpoint is a text-only model")
        messages = [{"role": m["role"], "content": text_of(m["content"])} for m in sample.messages]
        if self.chat:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return "\n".join(m["content"] for m in messages)

    def too_long(self, n: int) -> Optional[str]:
        """Why generating after a prompt of `n` tokens would run past the model's positions, or None (as vLLM
        refuses a request whose prompt + max_tokens exceeds max_model_len, even one that might stop early)."""
        if self.context is None or self.seq2seq:
            return None
        if n + self.params.max_new_tokens > self.context:
            return (f"prompt of {n} tokens + max_new_tokens {self.params.max_new_tokens} > the model's "
                    f"{self.context} positions (max_position_embeddings): shorten the prompt or max_new_tokens")
        return None

    def length(self, sample) -> int:
        try:
            return len(self.tokenizer(self.prompt(sample), add_special_tokens=not self.chat)["input_ids"])
        except Exception:
            return 0  # the error surfaces (per sample) when the batch runs

    def generate(self, samples) -> list:
        import torch
        prompts = [self.prompt(s) for s in samples]
        rows = self.tokenizer(prompts, add_special_tokens=not self.chat)["input_ids"]
        # a shared prompt prefix (system prompt, few-shot examples) is run once per batch, unless generate() would
        # expand the batch (beams, several sequences per prompt), which a prebuilt cache does not follow
        single = all(int(self.params.extra.get(k) or 1) == 1 for k in ("num_beams", "num_return_sequences"))
        ids, mask, _, cache = self.batch_layout(rows, self.share and single)
        kwargs = dict(max_new_tokens=self.params.max_new_tokens, pad_token_id=self.tokenizer.pad_token_id)
        if self.params.greedy:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(do_sample=True, temperature=self.params.temperature, top_p=self.params.top_p)
        kwargs.update(self.params.extra)
        if cache is not None:
            kwargs["past_key_values"] = cache
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), **kwargs)
        new = out if self.seq2seq else out[:, ids.shape[1]:]
        results = []
        for row, prompt_tokens in zip(new.tolist(), mask.sum(-1).tolist()):
            if self.seq2seq and row and row[0] == self.model.generation_config.decoder_start_token_id:
                row = row[1:]
            n = len(row)
            for k, tok in enumerate(row):
                if tok in self.eos_ids:
                    n = k + 1
                    break
            text = self.tokenizer.decode(row[:n], skip_special_tokens=True)
            results.append((text, {"prompt_tokens": int(prompt_tokens), "completion_tokens": n,
                                   "total_tokens": int(prompt_tokens) + n}))
        return results

    # ---- loglikelihood scoring ------------------------------------------------------------------------------
    def continuation(self, choice: str) -> str:
        """The text scored for `choice` after the prompt (lm-eval's (context, continuation) request's second half)."""
        return self.target_delimiter + choice

    def encode_choices(self, sample) -> ChoiceRequest:
        """lm-evaluation-harness's tokenisation of (prompt, continuation(choice)): the context's trailing whitespace
        moves to the continuation, context+continuation is encoded whole and the continuation's tokens are what
        follows the context's own encoding; an empty context is the eos token. The model reads the context's encoding
        followed by those tokens, as lm-eval feeds it (the whole encoding itself unless a token spans the boundary)."""
        if self.seq2seq:
            raise ValueError("choice_scoring=loglikelihood supports causal LMs only")
        if not sample.choices:
            raise ValueError(f"sample {sample.id!r} has no choices to score")
        context = self.prompt(sample)
        spaces = len(context) - len(context.rstrip())
        context, moved = (context[:-spaces], context[-spaces:]) if spaces else (context, "")
        ctx_ids = self.tokenizer(context, add_special_tokens=False)["input_ids"]
        wholes = self.tokenizer([context + moved + self.continuation(choice) for choice in sample.choices],
                                add_special_tokens=False)["input_ids"]
        continuations = tuple(tuple(whole[len(ctx_ids):]) for whole in wholes)
        if not ctx_ids:  # nothing to condition on: lm-eval prefixes the eos token
            if self.tokenizer.eos_token_id is None:
                raise ValueError(f"sample {sample.id!r}: empty prompt and the tokenizer has no eos token to start from")
            ctx_ids = [self.tokenizer.eos_token_id]
        longest = len(ctx_ids) + max(len(c) for c in continuations)
        if self.context is not None and longest > self.context:
            raise ValueError(f"sample {sample.id!r}: context of {len(ctx_ids)} tokens + its longest choice > the "
                             f"model's {self.context} positions (max_position_embeddings)")
        return ChoiceRequest(context=tuple(ctx_ids), continuations=continuations)

    def score(self, requests: list) -> list:
        """Per request, the summed log-probability of each continuation after its context.

        Two forwards (after the batch's shared prefix, run once: batch_layout): the contexts, left-padded (attention
        mask and position ids make each row what it is alone), whose last position scores every continuation's first
        token; then every continuation longer than one token, right-padded after a copy of its own context's
        key/value cache."""
        import torch
        pad = self.tokenizer.pad_token_id
        ctx_lens = [len(r.context) for r in requests]
        ids, mask, p, cache = self.batch_layout([r.context for r in requests], self.share)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        dev = self.device
        with torch.inference_mode():
            out = self.model(input_ids=ids[:, p:].to(dev), attention_mask=mask.to(dev),
                             position_ids=positions[:, p:].to(dev), past_key_values=cache, use_cache=True,
                             logits_to_keep=1)
            first = log_softmax(out.logits[:, -1]).cpu()
            # per choice, its tokens' float32 (or float64) log-probabilities; summed at the end in token order, as
            # the unbatched rule and lm-eval sum them, so only the forwards' rounding differs
            tokens = [[first[q, c[:1]] for c in r.continuations] for q, r in enumerate(requests)]
            rows = [(q, k) for q, r in enumerate(requests) for k, c in enumerate(r.continuations) if len(c) > 1]
            if rows:
                tails = [requests[q].continuations[k] for q, k in rows]
                length = max(len(t) for t in tails) - 1
                inputs = torch.full((len(rows), length), pad, dtype=torch.long)
                targets = torch.zeros((len(rows), length), dtype=torch.long)
                valid = torch.zeros((len(rows), length), dtype=torch.long)
                for j, t in enumerate(tails):
                    inputs[j, :len(t) - 1] = torch.tensor(t[:-1])
                    targets[j, :len(t) - 1] = torch.tensor(t[1:])
                    valid[j, :len(t) - 1] = 1
                owner = torch.tensor([q for q, _ in rows])
                cache = out.past_key_values
                cache.reorder_cache(owner.to(dev))
                del out
                starts = torch.tensor(ctx_lens)[owner]
                out = self.model(input_ids=inputs.to(dev), attention_mask=torch.cat([mask[owner], valid], 1).to(dev),
                                 position_ids=(starts[:, None] + torch.arange(length)).to(dev),
                                 past_key_values=cache, use_cache=True)
                logprobs = log_softmax(out.logits)
                picked = logprobs.gather(2, targets.to(dev)[:, :, None])[:, :, 0].cpu()
                for j, (q, k) in enumerate(rows):
                    tokens[q][k] = torch.cat([tokens[q][k], picked[j, :len(tails[j]) - 1]])
        return [[float(t.sum()) for t in per_choice] for per_choice in tokens]

    def choice_logprobs(self, sample) -> list:
        """One sample's choices scored alone (the loglikelihood rule of encode_choices and score)."""
        return self.score([self.encode_choices(sample)])[0]
