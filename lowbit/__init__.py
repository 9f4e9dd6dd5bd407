"""lowbit: serve LLMs quantized to 2-4 bits (QTIP, VPTQ, uniform) behind an OpenAI-compatible API."""

from .quantized_models.loader import load_model

__version__ = "0.1.0"
__all__ = ["load_model", "LLM", "SamplingParams", "__version__"]


def __getattr__(name):
    # The generation API pulls in the engine; import it on first use so `import lowbit` stays light.
    if name in ("LLM", "SamplingParams"):
        from . import llm

        return getattr(llm, name)
    raise AttributeError(name)
