"""diffutext: continuous diffusion for sequence-to-sequence text generation.

DiffuSeq-style models with the Distance Penalty training loss and Adaptive Decay Sampling of
Tang et al., "Can Diffusion Model Achieve Better Performance in Text Generation? Bridging the Gap
between Training and Inference!" (Findings of ACL 2023, arXiv 2305.04465).
"""

__version__ = "0.1.0"
