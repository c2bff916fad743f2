"""Samplers: functions that return index tensors into a flattened candidate set.

Used to bound the pixel pairs of every dense loss (design.md section 5).
"""

from __future__ import annotations

import torch
