"""featdenoise: Feature Denoising for Improving Adversarial Robustness (Xie et al., CVPR 2019).

Pixels are float RGB in [0, 1], NCHW, everywhere; normalisation is a layer of each model, so an
L-infinity budget of ``16 / 255`` is the paper's epsilon 16.
"""

__version__ = "0.1.0"
