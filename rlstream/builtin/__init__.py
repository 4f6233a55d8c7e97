"""The built-in task (``a+b=`` modulo 10), its tiny model and tokenizer built in code, the
built-in rewards and the built-in single-turn rollout: what runs when a config names no
dataset, model or rollout of its own."""
