"""Schedules: training progress -> Stage (patch size, keep ratios, ET++ bandwidth and
RandAugment magnitude), named presets, the FLOP cost model, LR / momentum schedules.

Progress is always budget spent / budget, in [0, 1].  See docs/schedules.md.
"""

from effkern.schedules.cost import (Calibration, ModelCfg, ViewSpec, calibrate, default_views_fn,
                                    describe, forward_flops, predicted_speedup, step_cost, tokens,
                                    unit_flops, view_cost)
from effkern.schedules.lr import lr_at, momentum_at, weight_decay_at
from effkern.schedules.presets import PRESETS, get_schedule
from effkern.schedules.stage import Schedule, Stage

__all__ = ["Stage", "Schedule", "PRESETS", "get_schedule", "ModelCfg", "ViewSpec", "tokens",
           "forward_flops", "unit_flops", "view_cost", "step_cost", "predicted_speedup",
           "describe", "default_views_fn", "Calibration", "calibrate", "lr_at", "momentum_at",
           "weight_decay_at"]
