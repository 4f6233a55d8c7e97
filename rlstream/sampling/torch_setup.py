"""Per-process torch setup for the processes that need torch (workers, trainer).

Imported lazily by those processes only; ``rlstream`` itself never imports torch.
"""
from __future__ import annotations

import logging
import os


def setup_torch(device: str, threads: int, seed: int):
    """Set threads (1 per process is fastest when processes share cores: docs/design.md
    §15.17 One torch thread per process), seed, quiet transformers, and return the
    torch.device to use."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    import transformers

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    return torch.device(device)


def load_model_and_tokenizer(path: str, device):
    """``from_pretrained`` for both; the same path for the tiny model and a real one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).to(device)
    return model, tokenizer
