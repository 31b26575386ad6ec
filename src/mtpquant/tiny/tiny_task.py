"""The tiny model's task: GSM-like multi-step arithmetic with worked steps and a `#### N` answer.

    prompt:  "37+48-19+5="
    target:  "85 66 71 #### 71\\n"      (each running total, then the answer in GSM8K's format)

Every value stays in 0..99, so each step is a 2-digit add or subtract on a number the model wrote itself:
one slip anywhere breaks the final answer, which is what makes small weight errors visible. lm-eval's GSM8K
strict-match regex (`#### (\\-?[0-9\\.\\,]+)`) scores it unchanged. Short on purpose (about 30 tokens with a
byte-level tokenizer) so that training takes minutes on two CPU cores. Same seed, same problems.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from mtpquant.core.atomic import atomic_write_bytes


def problem(rng: random.Random, steps: int, operand_max: int = 99) -> dict[str, Any]:
    value = rng.randint(0, 99)
    question, work = str(value), []
    for _ in range(steps):
        if rng.random() < 0.5 and value < 99:
            k = rng.randint(1, min(operand_max, 99 - value))
            value += k
            question += f"+{k}"
        else:
            k = rng.randint(1, min(operand_max, value)) if value > 0 else 0
            value -= k
            question += f"-{k}"
        work.append(str(value))
    return {"question": question + "=", "answer": f"{' '.join(work)} #### {value}\n", "result": value,
            "steps": steps}


def problems(seed: int, n: int, min_steps: int = 2, max_steps: int = 3, operand_max: int = 99) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [problem(rng, rng.randint(min_steps, max_steps), operand_max) for _ in range(n)]


def write_jsonl(rows: list[dict[str, Any]], path: Path) -> None:
    atomic_write_bytes(Path(path), "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode())


# The committed data files: (path, seed, count, row shape). Seeds are disjoint from training's (10_000 + ...).
DATA = {
    "data/tiny/arith-test.jsonl": (1, 200, "problem"),  # held-out eval set (lm-eval task tiny_arith)
    "data/calibration/tiny-arith.jsonl": (2, 128, "text"),  # in-distribution calibration text
    "data/tiny/arith-prompts.jsonl": (3, 512, "prompt"),  # bench prompts
}
MIN_STEPS, MAX_STEPS = 2, 3


def write_data(root: Path) -> list[Path]:
    out = []
    for rel, (seed, n, shape) in DATA.items():
        rows = problems(seed, n, MIN_STEPS, MAX_STEPS)
        if shape == "text":
            rows = [{"text": r["question"] + r["answer"]} for r in rows]
        elif shape == "prompt":
            rows = [{"prompt": r["question"]} for r in rows]
        write_jsonl(rows, Path(root) / rel)
        out.append(Path(root) / rel)
    return out
