"""Write data.jsonl: the built-in task's 100 problems, pre-tokenized.

    python make_data.py                      # with the built-in tiny tokenizer
    python make_data.py --tokenizer /path    # with a real model's tokenizer
"""
import argparse
import json
from pathlib import Path

if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--tokenizer", default=None)
    args = p.parse_args()
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        from rlstream.builtin.tiny_model import build_tokenizer

        tokenizer = build_tokenizer()
    with (Path(__file__).resolve().parent / "data.jsonl").open("w") as f:
        for a in range(10):
            for b in range(10):
                ids = tokenizer(f"{a}+{b}=", add_special_tokens=False)["input_ids"]
                f.write(json.dumps({"prompt_token_ids": ids, "answer": str((a + b) % 10)}) + "\n")
