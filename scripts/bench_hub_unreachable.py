"""How long a model load from a hub id takes to fail when the Hugging Face hub cannot be reached.

Run where the hub is unreachable (or pass --endpoint http://127.0.0.1:9 to simulate it):

    python scripts/bench_hub_unreachable.py [--model someuser/no-such-model] [--endpoint URL]

Prints the seconds to the one-line error with batchcap's hub guard, and without it (the guard's probe
forced to "reachable", so huggingface_hub's own retries run), measured in the same process.
"""

from __future__ import annotations

import argparse
import os
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="someuser/no-such-model-xyz")
    parser.add_argument("--endpoint", default=None, help="Hub endpoint to use (default: HF_ENDPOINT or the hub).")
    args = parser.parse_args()
    os.environ.pop("HF_HUB_OFFLINE", None)
    if args.endpoint:
        os.environ["HF_ENDPOINT"] = args.endpoint
    import huggingface_hub.utils.logging as hf_logging

    hf_logging.set_verbosity_error()  # the retry warnings would drown the figures
    import torch  # noqa: F401 - imported before the clock starts: only the load is timed
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperTokenizerFast  # noqa: F401

    from batchcap.items import FatalError
    from batchcap.models import common
    from batchcap.models.whisper import WhisperTranscriber

    def timed(label: str) -> None:
        start = time.perf_counter()
        try:
            WhisperTranscriber(args.model, device="cpu")
            message = "loaded?!"
        except FatalError as exc:
            message = str(exc)
        print(f"{label}: {time.perf_counter() - start:.1f} s  ({message[:90]}...)")

    timed("with the hub guard   ")
    real = common.hub_reachable
    common.hub_reachable = lambda timeout=common.HUB_PROBE_TIMEOUT: True  # type: ignore[assignment]
    try:
        timed("without (hub retries)")
    finally:
        common.hub_reachable = real


if __name__ == "__main__":
    main()
