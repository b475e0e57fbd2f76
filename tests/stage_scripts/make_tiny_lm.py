"""Build a tiny random text LM checkpoint offline (run in .venvs/inference).

    python make_tiny_lm.py OUT [--arch gpt2|llama] [--chat-template] [--train-steps N]

A byte-level BPE tokenizer is trained with `tokenizers` on a small corpus, the model is built from a config
and saved with save_pretrained, so the checkpoint loads through the Auto classes like a real one.
--train-steps fits the model a little on the corpus so greedy outputs are not all one token.
"""
import argparse
import json

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                          PreTrainedTokenizerFast)

CORPUS = [
    "What is two plus two? Four.", "The sky is blue.", "Grass is green.", "Hello, how are you today?",
    "I am fine, thank you.", "Question: what colour is the sea? Answer: blue.", "one two three four five",
    "The cat sat on the mat.", "A dog barks at night.", "Describe the sound. A high pitched beep.",
    "user assistant system", "Tell me a story about a fox.", "The answer is (B).", "(A) red (B) blue (C) green",
]
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
SPECIALS = ["<|endoftext|>", "<|pad|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]


def train_tokenizer(vocab_size=400):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=SPECIALS, show_progress=False)
    tok.train_from_iterator(CORPUS * 20, trainer=trainer)
    return tok


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--arch", choices=["gpt2", "llama"], default="gpt2")
    ap.add_argument("--chat-template", action="store_true")
    ap.add_argument("--train-steps", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    raw = train_tokenizer()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>", pad_token="<|pad|>",
                                        bos_token="<|endoftext|>")
    if args.chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    vocab = len(tokenizer)
    if args.arch == "gpt2":
        config = GPT2Config(vocab_size=vocab, n_positions=256, n_embd=32, n_layer=2, n_head=2,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        model = GPT2LMHeadModel(config)
    else:
        config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
        model = LlamaForCausalLM(config)
    if args.train_steps:
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        tokenizer.padding_side = "right"
        batch = tokenizer([t + tokenizer.eos_token for t in CORPUS], return_tensors="pt", padding=True)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        for step in range(args.train_steps):
            loss = model(**batch, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
    model.eval()
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(json.dumps({"out": args.out, "vocab": vocab, "params": sum(p.numel() for p in model.parameters())}))


if __name__ == "__main__":
    main()
