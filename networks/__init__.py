"""The networks tao-cli runs (mal, mask2former, mask_grounding_dino) and what they share (common, ops, backbones)."""
import logging as _logging

# torchao (the quantize extra) is imported by transformers whenever it is installed, and registers its enums with a
# torch call that torch 2.14 deprecates, logging two warnings per process that concern neither the user nor tao-cli.
_logging.getLogger("torch.utils._pytree").setLevel(_logging.ERROR)
