"""Models: CLIP (open_clip underneath, [0, 1] pixel inputs, normalisation inside)."""

from dvd.models.clip import DvdCLIP, create_clip, load_clip, register_model_configs, save_clip

__all__ = ["DvdCLIP", "create_clip", "load_clip", "register_model_configs", "save_clip"]
