"""cspine: a starter kit for cervical spine fracture detection on CT (RSNA 2022).

The method follows Salehinejad et al.: three CT windows stacked as channels, an Otsu crop with a 5% margin,
384×384 slices, a ResNet-50 trained on slices, then per-slice features into a bidirectional LSTM.
"""

import os

__version__ = "0.1.0"

# Nothing cspine runs may reach the network: albumentations asks the package index for updates at import,
# and the Hugging Face hub (timm's weights) would download. Set before any of them is imported; a user's
# own setting wins.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# The competition's eight targets, in submission order of `prediction_type`.
VERTEBRAE = ("C1", "C2", "C3", "C4", "C5", "C6", "C7")
TARGETS = ("patient_overall",) + VERTEBRAE
