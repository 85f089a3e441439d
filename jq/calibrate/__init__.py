"""Calibration: activation-range observers and streaming per-layer input statistics.

* :mod:`jq.calibrate.observers`: ``Observer(init, update, finalize)`` range estimators for static
  int8 activations, and :func:`act_params`.
* :mod:`jq.calibrate.stats`: :class:`LayerStats` (``XᵀX``, token count, per-channel ``max|x|`` and
  ``Σ|x|``) for GPTQ, AWQ and SmoothQuant.
"""
from jq.calibrate.collect import LayerInputs, Want, capture_inputs, collect, input_ranges
from jq.calibrate.observers import (HistogramState, MinMaxState, Observer, act_params, minmax,
                                    moving_average_minmax, mse_range, percentile)
from jq.calibrate.stats import (LayerStats, check_stats, hessian, init_stats, max_abs, mean_abs,
                                merge_stats, update_stats)

__all__ = ["collect", "capture_inputs", "input_ranges", "Want", "LayerInputs", "Observer", "MinMaxState", "HistogramState", "minmax", "moving_average_minmax",
           "percentile", "mse_range", "act_params", "LayerStats", "init_stats", "update_stats",
           "merge_stats", "check_stats", "hessian", "mean_abs", "max_abs"]
