"""One bench cell, run in its own process: read a JSON job on stdin, print one JSON result line.

Keeping each cell in a fresh process makes its peak resident memory its own.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> int:
    from squeeze import api
    from squeeze.errors import SqueezeError

    job = json.loads(sys.stdin.read())
    try:
        res = api.evaluate(job["artifact"], job["data"], reference=job["reference"], ctx=job["ctx"],
                           runtime=job["runtime"], progress=False)
        row = {k: res.to_dict()[k] for k in ("ppl", "kld", "top1_agreement", "tokens", "size_bytes")}
        if job.get("task"):
            tokenizer = None
            if not Path(job["artifact"]).is_dir():
                from squeeze.model import load_tokenizer

                tokenizer = load_tokenizer(Path(job["reference"]))
            task = api.evaluate_task(job["artifact"], job["task"], tokenizer=tokenizer, runtime=job["runtime"],
                                     progress=False)
            row["task_accuracy"] = task.accuracy
            row["task_accuracy_norm"] = task.accuracy_norm
        speed = api.measure_speed(job["artifact"], runtime=job["runtime"], **job["latency"])
        row.update(
            p50_ms=speed["forward"]["p50_ms"],
            p95_ms=speed["forward"]["p95_ms"],
            prefill_tokens_per_s=speed["prefill_tokens_per_s"],
            decode_tokens_per_s=speed["decode_tokens_per_s"],
            decode_ms_per_token=1000.0 * speed["batch"] / speed["decode_tokens_per_s"],
            peak_rss_bytes=speed["peak_rss_bytes"],
            latency_settings={k: speed[k] for k in ("batch", "prompt_tokens", "new_tokens")},
        )
    except SqueezeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
