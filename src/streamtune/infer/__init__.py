"""Generate, chat and evaluate on the same engine and placement as training.

Public API::

    with open_model("runs/quickstart", InferenceOptions(device="cpu")) as loaded:
        print(generate(loaded, "Name three primary colors.", SamplingOptions(max_new_tokens=32)))
        print(evaluate_file(loaded, "data/eval.jsonl").perplexity)
"""

from streamtune.infer.evaluate import EvalResult, evaluate_file
from streamtune.infer.generate import SamplingOptions, generate
from streamtune.infer.session import InferenceModel, InferenceOptions, open_model
from streamtune.infer.source import ModelSource, resolve_source

__all__ = ["EvalResult", "InferenceModel", "InferenceOptions", "ModelSource", "SamplingOptions", "evaluate_file",
           "generate", "open_model", "resolve_source"]
