"""Serve requests through a checkpoint's handler.py as Inference Endpoints do, beside the pipeline; print JSON.

    python endpoint.py CHECKPOINT REQUESTS.json

REQUESTS.json holds {"good": [request, ...], "bad": [request, ...]}. The handler module is imported from its file
with the checkpoint folder on sys.path (huggingface-inference-toolkit's way), then:
- "handler" / "pipeline": each good request answered by the handler and by `pipeline("image-text-to-text")` with the
  same messages and parameters;
- "errors": for each bad request, the exception's class and whether it is the handler's RequestError, and message;
- "after_errors": the first good request again;
- "threads": every good request twice, from 4 threads at once.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
from concurrent.futures import ThreadPoolExecutor

from transformers import pipeline


def load_handler_module(folder: str):
    spec = importlib.util.spec_from_file_location("handler", f"{folder}/handler.py")
    sys.path.insert(0, folder)
    module = importlib.util.module_from_spec(spec)
    sys.modules["handler"] = module
    spec.loader.exec_module(module)
    return module


def main(folder: str, requests_path: str) -> None:
    with open(requests_path) as file:
        requests = json.load(file)
    module = load_handler_module(folder)
    handler = module.EndpointHandler(folder)
    pipe = pipeline("image-text-to-text", model=folder, trust_remote_code=True)
    good = requests["good"]
    results = {"handler": [handler(copy.deepcopy(request)) for request in good]}
    results["pipeline"] = [pipe(text=r["inputs"], **r.get("parameters", {})) for r in good]
    results["errors"] = []
    for request in requests["bad"]:
        try:
            handler(request)
            results["errors"].append(None)
        except Exception as error:
            results["errors"].append([type(error).__name__, isinstance(error, module.RequestError), str(error)])
    results["after_errors"] = handler(copy.deepcopy(good[0]))
    with ThreadPoolExecutor(max_workers=4) as pool:
        results["threads"] = list(pool.map(handler, copy.deepcopy(good + good)))
    print(json.dumps(results))


if __name__ == "__main__":
    main(*sys.argv[1:])
