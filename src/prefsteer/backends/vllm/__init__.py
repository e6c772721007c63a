"""PLACEHOLDER"""

from prefsteer.backends.vllm.backend import VLLMBackend, hf_fingerprint, resolve_checkpoint, vllm_safe_dir

__all__ = ["VLLMBackend", "hf_fingerprint", "resolve_checkpoint", "vllm_safe_dir"]
