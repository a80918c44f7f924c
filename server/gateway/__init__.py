"""Gateway mode of the service (``cai serve --upstream URL ... --upstream-model NAME``): chat completions, the
critique extension, critique and revise, with the generation done by OpenAI-compatible engines (vLLM, TGI, SGLang,
llama.cpp, Ollama, another ``cai serve``). ``upstream`` (the engines, through the openai backend's retries, balancing
and cool-down), ``stream`` (relaying a streamed answer), ``protocol`` (what upstreams send, typed), ``chat`` (the
chat handler), ``backend`` (cai's Backend over the upstream, for the pipeline)."""

from server.gateway.upstream import Upstream

__all__ = ["Upstream"]
