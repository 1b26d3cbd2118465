"""diffutext: continuous diffusion for sequence-to-sequence text generation.

DiffuSeq-style models with the Distance Penalty training loss and Adaptive Decay Sampling of
Tang et al., "Can Diffusion Model Achieve Better Performance in Text Generation? Bridging the Gap
between Training and Inference!" (Findings of ACL 2023, arXiv 2305.04465).
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    """`diffutext.load` (api.py), imported on first use so that `import diffutext` and `--help` stay light."""
    if name in ("load", "Model"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'diffutext' has no attribute {name!r}")
