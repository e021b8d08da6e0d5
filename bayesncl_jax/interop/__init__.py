"""Interoperability with other implementations of the method.

`torch_checkpoint`: the authors' PyTorch checkpoints (solo-learn / Lightning
`.ckpt`, torchvision ResNet `state_dict`) to and from this project's Flax
parameters. PyTorch is an optional dependency (`pip install .[torch]`),
imported only when a checkpoint is actually read or written.
"""
