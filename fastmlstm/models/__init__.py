"""The byte language model and its files.

- :mod:`.lm`: ``ByteLM`` (byte embedding -> multiplicative LSTM -> readout), generation.
- :mod:`.serialization`: every model file and folder (``.pt``, training checkpoints, the released
  layout, ``config.json`` + ``model.safetensors``) and ``from_pretrained``.
- :mod:`.openai_weights`: the released 15-``.npy`` layout <-> a ByteLM's config and state dict.
- :mod:`.pretrained`: registered pretrained models and their checked download.
- :mod:`.hub`: Hugging Face Hub transfers (optional ``huggingface_hub``).
"""

from .lm import ByteLM
from .serialization import from_pretrained, load, load_openai, save, save_openai, save_pretrained

__all__ = ["ByteLM", "from_pretrained", "load", "load_openai", "save", "save_openai", "save_pretrained"]
