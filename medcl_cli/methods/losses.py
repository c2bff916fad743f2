"""Loss functions of the contrastive methods: pure tensor functions, shape-documented, paper-cited.

Each is tested against a slow, obvious reference in tests/test_losses_*.py. Inputs are L2-normalised
embeddings unless a docstring says otherwise. Sections below belong to the method families; keep new
functions inside their section.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# ==== global / supervised contrast (SimCLR, GCL, semicl) ===========================================

# ==== PDCR (Liu/Li et al., TMI 2022) ===============================================================

# ==== ARCO (You et al., NeurIPS 2023) ==============================================================
