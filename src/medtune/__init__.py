"""medtune: fine-tune foundation models on medical images with LoRA/QLoRA, supervised and by RL."""
__version__ = "0.1.0"
