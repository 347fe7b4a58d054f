"""`confidence`, an lmforge extension of /v1/chat/completions: how sure the model is of its
answer, as a top-level `confidence` object (infer/confidence.py holds the two signals).

- `"confidence": "logprob"`: the engine records each answer token's log-probability (as for
  `logprobs`, which stay out of the response unless asked for); the field is
  {"method", "score" = exp(mean logprob), "mean_logprob", "tokens"}. It streams: the field
  rides on the finish chunk.
- `"confidence": "self_consistency"`: `confidence_samples` (k, default 5) more answers to the
  same prompt are queued beside the answer (the engine batches them), at the request's
  temperature, or 0.7 when the request is greedy; the field is {"method", "score" = the share
  that agree with the answer, "samples", "agreeing"}. Not with `stream`: the score needs every
  sample, after the answer has been sent.
"""

from __future__ import annotations

import dataclasses

from lmforge.infer.confidence import logprob_confidence, self_consistency
from lmforge.serve.protocol import APIError, ChatRequest
from lmforge.serve.state import Server, request_events

SAMPLE_TEMPERATURE = 0.7  # for the samples of a greedy request: greedy samples would all agree


def check(body: ChatRequest) -> None:
    if body.confidence == "self_consistency" and body.stream:
        raise APIError(
            400,
            'confidence "self_consistency" cannot stream: its score needs every sample; use '
            '"logprob" or stream=false',
            param="confidence",
            code="unsupported_parameter",
        )


def wants_logprobs(body: ChatRequest) -> bool:
    """The engine records token logprobs when the client asks for them or for their mean."""
    return body.logprobs or body.confidence == "logprob"


def submit_samples(srv: Server, body: ChatRequest, prompt_ids: list[int], params, answer):
    """The k self-consistency samples of the request `answer`, queued now so they run in its
    batch: [(engine request, inbox)]; none unless asked for. A full queue (429) cancels the
    answer and the samples queued so far: half a request must not keep running."""
    if body.confidence != "self_consistency":
        return []
    temperature = params.temperature or SAMPLE_TEMPERATURE
    out = []
    try:
        for i in range(body.confidence_samples):
            seed = None if params.seed is None else params.seed + 1 + i  # reproducible
            p = dataclasses.replace(params, temperature=temperature, seed=seed, logprobs=False)
            out.append(srv.submit(prompt_ids, p, f"{answer.id}-sample{i}", "messages"))
    except APIError:
        answer.cancel()
        cancel(out)
        raise
    return out


def cancel(samples) -> None:
    """The answer failed or its client left: the samples are not needed any more."""
    for req, _ in samples:
        req.cancel()


def logprob_field(body: ChatRequest, req) -> dict:
    """{"confidence": ...} by logprob, once the answer is complete (empty unless asked for)."""
    if body.confidence != "logprob":
        return {}
    return {"confidence": logprob_confidence(req.logprobs)}


async def sampled_field(http, req, samples) -> dict:
    """{"confidence": ...} by self-consistency once the samples are done (empty without)."""
    if not samples:
        return {}
    for sample, events in samples:
        async for _ in request_events(http, sample, events):
            pass
    answers = [s.text for s, _ in samples if s.finish_reason in ("stop", "length")]
    if not answers:  # every sample failed (an engine error): no score rather than a made-up one
        raise APIError(500, "no self-consistency sample finished", "server_error")
    return {"confidence": self_consistency(req.text, answers.__getitem__, len(answers))}
