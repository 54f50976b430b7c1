"""Build the bundled multiple-choice task from the bundled evaluation stories (seeded, reproducible).

For each story: the context is its first sentences, the correct choice is the sentence that
follows, and three distractors are sentences drawn from other stories. Writes
calibration/stories260K-cloze-eval.jsonl. Run: python bench/make_cloze_task.py
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "calibration" / "stories260K-samples-eval.txt"
OUT = ROOT / "calibration" / "stories260K-cloze-eval.jsonl"
CONTEXT_SENTENCES = 3
DISTRACTORS = 3


def sentences(story: str) -> list[str]:
    parts = re.split(r"(?<=[.!?])\s+", " ".join(story.split()))
    return [p for p in parts if len(p) > 10]


def main() -> None:
    stories = [sentences(s) for s in SOURCE.read_text().split("\n\n") if s.strip()]
    stories = [s for s in stories if len(s) > CONTEXT_SENTENCES]
    rng = random.Random(0)
    with OUT.open("w") as fh:
        for i, story in enumerate(stories):
            answer = story[CONTEXT_SENTENCES]
            others = [s for j, st in enumerate(stories) if j != i for s in st[1:]]
            choices = [answer] + rng.sample([s for s in others if s != answer], DISTRACTORS)
            rng.shuffle(choices)
            item = {"context": " ".join(story[:CONTEXT_SENTENCES]), "choices": [" " + c for c in choices],
                    "label": choices.index(answer)}
            fh.write(json.dumps(item) + "\n")
    print(f"wrote {OUT} ({len(stories)} items)")


if __name__ == "__main__":
    main()
