"""One bench cell, run in its own process: read a JSON job on stdin, print one JSON result line.

Keeping each cell in a fresh process makes its peak resident memory its own.
"""

from __future__ import annotations

import json
import sys


# the eval_report keys a bench row keeps
ROW_KEYS = ("ppl", "kld", "top1_agreement", "tokens", "size_bytes", "task_accuracy", "task_accuracy_norm", "p50_ms",
            "p95_ms", "prefill_tokens_per_s", "decode_tokens_per_s", "peak_rss_bytes", "latency_settings")


def main() -> int:
    from squeeze import api
    from squeeze.errors import SqueezeError

    job = json.loads(sys.stdin.read())
    try:
        report = api.eval_report(job["artifact"], job["data"], reference=job["reference"], ctx=job["ctx"],
                                 runtime=job["runtime"], task=job.get("task"), latency=job["latency"],
                                 progress=False)
    except SqueezeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    row = {k: report[k] for k in ROW_KEYS if not (k.startswith("task_") and job.get("task") is None)}
    row["decode_ms_per_token"] = 1000.0 * report["latency_settings"]["batch"] / report["decode_tokens_per_s"]
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
