"""Offline Python API in the spirit of vLLM: `LLM(model).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

from .engine import LLMEngine
from .engine_args import EngineArgs
from .errors import InvalidRequestError
from .loader import Checkpoint
from .outputs import RequestOutput
from .sampling import SamplingParams


class LLM:
    """`LLM(model="default", **engine_args)`; engine_args are `EngineArgs` fields
    (quantization="int8", max_num_seqs=..., kv_cache_bytes=..., ...)."""

    def __init__(self, model: str | Checkpoint = "default", **engine_args):
        self.engine = LLMEngine(model, EngineArgs(**engine_args))
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def _next_id(self) -> str:
        return f"llm-{next(self._ids)}"

    @staticmethod
    def _as_prompt_list(prompts) -> list:
        if isinstance(prompts, str):
            return [prompts]
        if isinstance(prompts, Sequence) and prompts and all(isinstance(t, int) for t in prompts):
            return [list(prompts)]  # one prompt given as token ids
        return list(prompts)

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """prompts: a string, a list of token ids, or a list of either. Outputs in prompt order."""
        plist = self._as_prompt_list(prompts)
        if isinstance(sampling_params, (list, tuple)):
            if len(sampling_params) != len(plist):
                raise InvalidRequestError("sampling_params", f"{len(sampling_params)} given for {len(plist)} prompts")
            params = list(sampling_params)
        else:
            params = [sampling_params or SamplingParams()] * len(plist)
        # validate every prompt before enqueuing any, so a bad one leaves the engine untouched
        reqs = [self.engine.prepare_request(self._next_id(), p, sp) for p, sp in zip(plist, params)]
        for r in reqs:
            self.engine.add_prepared(r)
        order = {r.request_id: i for i, r in enumerate(reqs)}
        results: list[RequestOutput | None] = [None] * len(reqs)
        bar = None
        if use_tqdm and len(reqs) > 1:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(reqs), desc="generate", unit="req")
        try:
            while any(r is None for r in results):
                for out in self.engine.step():
                    if out.finished and out.request_id in order:
                        results[order[out.request_id]] = out
                        if bar is not None:
                            bar.update(1)
        except BaseException:
            for r in reqs:
                self.engine.abort_request(r.request_id)
            raise
        finally:
            if bar is not None:
                bar.close()
        return results  # type: ignore[return-value]

    def chat(self, messages: list[dict], sampling_params: SamplingParams | None = None,
             use_tqdm: bool = False) -> RequestOutput:
        """Apply the model's chat template to one conversation and generate the assistant turn."""
        return self.generate([self._chat_prompt(messages)], sampling_params, use_tqdm=use_tqdm)[0]

    def _chat_prompt(self, messages: list[dict]) -> list[int]:
        tok = self.engine.tokenizer
        if tok is None:
            raise InvalidRequestError("messages", "chat needs a tokenizer with a chat template; this model has none")
        text = tok.apply_chat_template(messages, add_generation_prompt=True)
        # the template already holds the special tokens (BOS / <|im_start|>): add none on top
        return tok.encode(text, add_special_tokens=False)

    def stream(self, prompt: str | list[int], params: SamplingParams | None = None,
               chat: bool = False) -> Iterator[RequestOutput]:
        """Yield a RequestOutput per generated token (`.new_text` is the delta). `chat=True` treats
        `prompt` as one user message and applies the chat template. Closing the iterator aborts."""
        if chat:
            msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            prompt = self._chat_prompt(msgs)
        rid = self._next_id()
        self.engine.add_request(rid, prompt, params)
        finished = False
        try:
            while not finished:
                for out in self.engine.step():
                    if out.request_id == rid:
                        finished = out.finished
                        yield out
        finally:
            if not finished:
                self.engine.abort_request(rid)
