"""specoff: speculative decoding for language models too large for the GPU.

The target's weights stream from host memory; a small draft on the GPU proposes tokens
that the target verifies many at a time (SpecOffload, arXiv 2505.10259; SpecExec,
arXiv 2406.02532).
"""
from .config import ModelConfig, UnsupportedModelError
from .engine import LLM
from .options import CacheOptions, EngineOptions, KernelOptions, OptionsError, SpecOptions
from .outputs import GenerationStats, RequestOutput
from .sampling import SamplingParams
from .weights import CheckpointError, load_model, load_tokenizer

__all__ = ["LLM", "SamplingParams", "RequestOutput", "GenerationStats", "ModelConfig",
           "EngineOptions", "SpecOptions", "CacheOptions", "KernelOptions", "OptionsError",
           "load_model", "load_tokenizer", "CheckpointError", "UnsupportedModelError"]
__version__ = "0.1.0"
