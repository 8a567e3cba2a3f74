"""Text encoders: flan-t5-xl (from a local directory) for the real models, a tiny T5 for the tiny one.

``encode(prompts) -> (features (B, L, C_text) float32, lengths (B,) int32)`` where L = the longest
prompt of the batch in tokens (padding beyond a prompt's length is masked by ``lengths``). A prompt
longer than the encoder's limit is an error, never silently truncated.
"""
from __future__ import annotations

from pathlib import Path

import torch


class PromptTooLongError(ValueError):
    """A prompt that exceeds the text encoder's token limit."""


class ByteTokenizer:
    """UTF-8 bytes + 3 (0 pad, 1 eos, 2 unk), eos appended: a tokenizer that needs no download."""

    vocab_size = 259

    def __call__(self, prompt: str) -> list[int]:
        return [b + 3 for b in prompt.encode("utf-8")] + [1]


class TextEncoder(torch.nn.Module):
    """A T5 encoder with its tokenizer; ``max_length`` tokens at most (eos included)."""

    def __init__(self, encoder: torch.nn.Module, tokenize, max_length: int, label: str):
        super().__init__()
        self.encoder, self.tokenize, self.max_length, self.label = encoder, tokenize, max_length, label

    @property
    def width(self) -> int:
        return self.encoder.config.d_model

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        input_ids, mask = tokenize_batch(self.tokenize, prompts, self.max_length, self.label)
        dev = next(self.encoder.parameters()).device
        out = self.encoder(input_ids=input_ids.to(dev), attention_mask=mask.to(dev))["last_hidden_state"]
        return out.float(), mask.sum(1).to(torch.int32).to(dev)


def tokenize_batch(tokenize, prompts: list[str], max_length: int, label: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask (B, L) int64, L = the longest prompt; PromptTooLongError past the limit."""
    ids = [list(tokenize(p)) for p in prompts]
    for p, t in zip(prompts, ids):
        if len(t) > max_length:
            raise PromptTooLongError(f"--prompt: {len(t)} tokens exceed the {label} text encoder's limit of "
                                     f"{max_length} ({p[:40]!r}...)")
    L = max(len(t) for t in ids)
    input_ids = torch.zeros(len(ids), L, dtype=torch.long)
    mask = torch.zeros(len(ids), L, dtype=torch.long)
    for i, t in enumerate(ids):
        input_ids[i, :len(t)] = torch.tensor(t)
        mask[i, :len(t)] = 1
    return input_ids, mask


def tiny_text_encoder(width: int, max_length: int, seed: int = 0, weights: str | Path | None = None) -> TextEncoder:
    """A 2-layer T5 encoder of ``width`` channels with a byte tokenizer: randomly initialised from ``seed``,
    or trained weights from a safetensors file (strictly loaded)."""
    from .importable import prepare_transformers_import
    prepare_transformers_import()
    from transformers import T5Config, T5EncoderModel
    cfg = T5Config(vocab_size=ByteTokenizer.vocab_size, d_model=width, d_kv=width // 4, d_ff=2 * width,
                   num_layers=2, num_heads=4, dropout_rate=0.0, feed_forward_proj="gated-gelu")
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        enc = T5EncoderModel(cfg).eval()
    finally:
        torch.random.set_rng_state(state)
    if weights is not None:
        from .checkpoint import load_into
        load_into(enc, weights)
    return TextEncoder(enc, ByteTokenizer(), max_length, "tiny (random)" if weights is None else "tiny (trained)")


def t5_text_encoder(path: str | Path, max_length: int = 512, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu") -> TextEncoder:
    """flan-t5-xl (or any T5) from a local directory holding its config, weights and tokenizer."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"--t5: {path} is not a directory (a local flan-t5-xl directory)")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"--t5: {path} is not a T5 directory (no config.json)")
    from .importable import prepare_transformers_import
    prepare_transformers_import()
    from transformers import AutoTokenizer, T5EncoderModel
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        enc = T5EncoderModel.from_pretrained(str(path), local_files_only=True, torch_dtype=dtype).to(device).eval()
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ValueError(f"--t5: {path}: cannot load the T5 tokenizer and encoder ({first})") from None
    return TextEncoder(enc, lambda p: tok(p, add_special_tokens=True)["input_ids"], max_length, path.name)
