"""The HTTP service (FastAPI) over the ``cai`` library: the fine-tuned model (OpenAI-compatible) beside the live
critique pipeline. It imports ``cai``; ``cai`` never imports it. The routes arrive with the server work; until then
this package only marks the boundary."""
