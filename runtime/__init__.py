"""memserve.runtime — the mechanism (loading, model forward, paged KV, sampling, engine).

Re-exports are lazy so that `memserve.runtime.errors` (used by the serving layer) does not pull in torch.
"""

__all__ = ["LLM", "SamplingParams", "EngineArgs", "LLMEngine"]


def __getattr__(name):
    if name == "LLM":
        from .llm import LLM
        return LLM
    if name == "SamplingParams":
        from .sampling import SamplingParams
        return SamplingParams
    if name in ("EngineArgs", "LLMEngine"):
        from . import engine
        return getattr(engine, name)
    raise AttributeError(f"module 'memserve.runtime' has no attribute {name!r}")
