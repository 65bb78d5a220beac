"""What the engine returns for a request after each step."""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(slots=True)
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None


@dataclass(slots=True)
class RequestOutput:
    """Cumulative `token_ids` / `text` plus this step's delta (`new_token_ids`, `new_text`).

    While a request has stop strings, up to (longest stop string - 1) trailing characters are held
    back from `text`/`new_text` until it is clear they do not start a stop string, so concatenating
    every `new_text` always equals the final `text` (which ends before the stop string).
    """

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    new_token_ids: list[int]
    new_text: str
    finish_reason: str | None  # None | "stop" | "length" | "abort"
    num_cached_tokens: int = 0
    metrics: RequestMetrics | None = None
    prompt: str | None = None
    stop_reason: str | int | None = None  # the stop string / stop token that ended the request
    session_id: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def outputs(self) -> list[RequestOutput]:
        """vLLM-style `out.outputs[0].text` access (one completion per request)."""
        return [self]


def merge_outputs(parts: list):
    """Consecutive outputs of one request as one: the deltas (`new_token_ids`, `new_text`) joined in
    order, every cumulative field (`token_ids`, `text`, finish_reason, ...) from the newest. Streaming
    the merged output gives a client the same tokens and text as streaming the parts one by one.
    Works on any dataclass output (RequestOutput, the serving test double's)."""
    if len(parts) == 1:
        return parts[0]
    return replace(parts[-1], new_token_ids=[t for p in parts for t in p.new_token_ids],
                   new_text="".join(p.new_text for p in parts))
