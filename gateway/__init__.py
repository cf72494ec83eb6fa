"""vllm-gateway: an OpenAI-compatible gateway for fleets of vLLM workers."""

__version__ = "0.1.0"
