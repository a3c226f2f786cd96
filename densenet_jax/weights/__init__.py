"""Weight files and where they come from; no model is built here (that is ``densenet_jax.factory``).

format       our safetensors files: arrays, config, class names and preprocessing in one file
torch_keys   the table between torchvision's/timm's state-dict keys and ours, both ways, and the
             architecture read off a checkpoint's shapes
torch_files  torch's .pth/.pt pickles (read ``weights_only``) and the ``convert`` command's work
hub          timm's repos on the Hugging Face Hub, through huggingface_hub's cache
hub_files    a Hub repo's files: timm's hf-hub: grammar, huggingface_hub's errors, damaged cached files
"""
