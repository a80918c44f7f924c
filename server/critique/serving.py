"""``/v1/critique`` and ``/v1/revise`` without HTTP: a request model in, a response model out (see
:mod:`server.critique.pipeline` for how the stages run)."""

from __future__ import annotations

from collections.abc import Callable

from cai.backends.base import Completion, Sampling
from cai.core.prompts import critique_messages
from cai.core.record import Record
from cai.generate.generator import check_output, draw_principles
from server.critique.pipeline import Pipeline
from server.critique.protocol import (
    ConstitutionRef,
    Critique,
    CritiqueRequest,
    CritiqueResponse,
    ReviseRequest,
    SamplingUsed,
)
from server.errors import GenerationFailed, InvalidRequest
from server.openai.protocol import Usage
from server.settings import Limits
from server.user_text import SpecialTokenFilter


class CritiqueServing:
    """``on_usage(model, prompt_tokens, completion_tokens)`` is told the usage of every answered request."""

    def __init__(self, pipeline: Pipeline, neutralise: SpecialTokenFilter, limits: Limits,
                 on_usage: Callable[[str, int, int], None]):
        self.pipeline = pipeline
        self.neutralise = neutralise
        self.limits = limits
        self.on_usage = on_usage

    async def critique(self, req: CritiqueRequest) -> CritiqueResponse:
        """Critique ``response`` against each principle named (or one drawn, as `cai generate` would draw it for
        this conversation and seed). One batched backend call, with the prompts of
        :func:`cai.core.prompts.critique_messages`."""
        p = self.pipeline
        c = p.constitution(req.constitution)
        model = req.model or p.source.base_name
        backend = p.backend(model)
        item = p.item(self.neutralise.messages(req.messages))
        sampling = self._sampling(req)
        ids = p.principles(c, req.principles) if req.principles else draw_principles(c, item.id, sampling.seed, 1)
        response = self.neutralise(req.response)
        batch = [critique_messages(c, item.messages, response, c.principle(pid)) for pid in ids]
        p.source.check_admission()
        completions = await p.generate(backend, batch, sampling, sampling.seed)
        critiques = []
        for pid, comp in zip(ids, completions):
            if comp.error is not None:
                raise GenerationFailed(comp.error)
            principle = c.principle(pid)
            critiques.append(Critique(principle=pid, principle_sha256=principle.sha256, critique=comp.text,
                                      finish_reason=comp.finish_reason,
                                      flags=check_output(comp, [principle.critique])))
        usage = Usage.of(sum(x.prompt_tokens for x in completions), sum(x.completion_tokens for x in completions))
        self.on_usage(model, usage.prompt_tokens, usage.completion_tokens)
        return CritiqueResponse(model=model, prompt_id=item.id,
                                constitution=ConstitutionRef(name=c.name, version=c.version, sha256=c.sha256),
                                critiques=critiques, sampling=SamplingUsed(**sampling.to_dict()), usage=usage)

    async def revise(self, req: ReviseRequest) -> Record:
        """The whole pipeline on one conversation: the record `cai generate` writes (``response``, when given, is
        the initial answer instead of a generated one)."""
        p = self.pipeline
        c = p.constitution(req.constitution)
        model = req.model or p.source.base_name
        backend = p.backend(model)
        revision = p.revision(c.name, req.principles, req.rounds)
        item = p.item(self.neutralise.messages(req.messages))
        sampling = self._sampling(req)
        plan = p.plan(item, revision, backend, sampling)
        p.check_context(revision, backend, plan, sampling)
        answer = None
        if req.response is not None:
            answer = Completion(self.neutralise(req.response).strip(), 0, 0, "stop")
        p.source.check_admission()
        record = await p.record(backend, item, revision, sampling, answer)
        self.on_usage(model, record.usage["prompt_tokens"], record.usage["completion_tokens"])
        return record

    def _sampling(self, req: CritiqueRequest | ReviseRequest) -> Sampling:
        d = Sampling()
        max_tokens = req.max_tokens if req.max_tokens is not None else self.limits.default_max_tokens
        if not 1 <= max_tokens <= self.limits.max_tokens:
            raise InvalidRequest(f"max_tokens must be between 1 and {self.limits.max_tokens} on this server, got "
                                 f"{max_tokens}", "max_tokens")
        return Sampling(temperature=d.temperature if req.temperature is None else req.temperature,
                        top_p=d.top_p if req.top_p is None else req.top_p, max_new_tokens=max_tokens,
                        seed=d.seed if req.seed is None else req.seed)
