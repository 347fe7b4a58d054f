"""Tasks: what a question looks like, what its answer is, and how an answer is checked, in one
place for both `lmforge eval` (which scores a model) and RL (`grpo`, `ppo`'s qa reward, which
turn the same check into a reward).

The one idea: a task is a prompt format, an answer extractor and a checker, and nothing else:
no model, no generation loop. GSM8K (`gsm8k.py`), the arithmetic task (`arithmetic.py`), the
reference-answer checker (`qa.py`) and the multiple-choice benchmarks (`multiple_choice.py`
reading the `*.yaml` definitions here) sit below eval/ and align/, importing only config,
tokenizer and data.readers.
"""
