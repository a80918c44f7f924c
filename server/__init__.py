"""The HTTP service (FastAPI) over the ``cai`` library: the fine-tuned model (OpenAI-compatible) beside the live
critique pipeline. It imports ``cai``; ``cai`` never imports it.

By feature: ``openai/`` (chat completions), ``critique/`` (critique, revise), ``admin/`` (health, metrics, models,
constitutions), each with its typed wire format (``protocol.py``), a serving class that knows nothing of HTTP
(``serving.py``) and thin routes (``routes.py``); ``engine/`` (the inference worker); ``constitutions/`` (the live
registry). Around them: ``app.py`` (the application and its lifespan), ``state.py`` and ``deps.py`` (what routes
depend on), ``errors.py`` (the one exception-to-HTTP map), ``security.py``, ``settings.py``, ``runner.py``."""
