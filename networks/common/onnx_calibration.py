"""Histogram (entropy) calibration of an ONNX graph in the memory of one calibration batch, and its threshold
search on every core.

ONNX Runtime's ``HistogramCalibrater.collect_data`` keeps every calibrated tensor of every calibration batch in
memory before it builds a single histogram: on the Mask2Former Swin-T graph at 384 px that is 936 MiB per image,
so TAO's default of 64 calibration images needs ~60 GB, and at 1024 px several times more.  Feeding it batch by
batch instead bounds the memory but changes the result: each later batch with a wider range re-bins the
histogram around the first batch's range (ModelOpt patches ONNX Runtime that way).

:func:`collect_histograms` keeps ONNX Runtime's result exactly and one batch in memory, in two passes over the
feeds: the first finds each tensor's range over all of them, which is the range ONNX Runtime would give the
histogram of all batches at once; the second adds each batch's histogram over that range.  Counting values into
fixed bins is additive over any split of the data, so the histograms, and the thresholds the KL-divergence search
picks from them, are the ones of the all-at-once calibration (``tests/networks/common/test_onnx_calibration.py``).
The price is a second inference pass over the calibration set.

ONNX Runtime then searches each tensor's threshold one after the other in Python (~0.7 s per tensor at 2048 bins
on this CPU: 7 minutes for the ~600 tensors of a Swin-T Mask2Former).  :func:`entropy_ranges` runs the same
search, ONNX Runtime's own function on the same histograms, in worker processes, so the result is unchanged.
"""
from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np

__all__ = ["collect_histograms", "entropy_ranges"]


def _tensor_extremes(session: Any, index: list[tuple[int, str]], feeds: Iterator[dict]) -> dict[str, tuple[Any, Any]]:
    """``{name: (min, max)}`` over all ``feeds`` of the ``session`` outputs ``index`` ((output position, name)),
    NaN ignored, as numpy scalars of the tensor's dtype (``(0, 0)`` for a tensor that is always empty).
    ValueError when ``feeds`` is empty."""
    lo: dict[str, Any] = {}
    hi: dict[str, Any] = {}
    empty_dtype: dict[str, Any] = {}
    seen = 0
    for feed in feeds:
        seen += 1
        values = session.run(None, feed)
        for i, name in index:
            a = np.asarray(values[i])
            if a.size == 0:
                empty_dtype.setdefault(name, a.dtype)
                continue
            mn, mx = np.nanmin(a), np.nanmax(a)
            # fmin/fmax skip a NaN from an all-NaN batch, as nanmin over all batches together would
            lo[name] = mn if name not in lo else np.fmin(lo[name], mn)
            hi[name] = mx if name not in hi else np.fmax(hi[name], mx)
    if not seen:
        raise ValueError("No data is collected.")
    for name, dtype in empty_dtype.items():
        if name not in lo:
            lo[name] = hi[name] = np.array(0, dtype=dtype)
    return {name: (lo[name], hi[name]) for _, name in index}


def collect_histograms(calibrator: Any, feeds: Callable[[], Iterator[dict]]) -> None:
    """Fill ``calibrator`` (ONNX Runtime's ``EntropyCalibrater``, as ``create_calibrator`` builds it) with the
    histograms its own ``collect_data`` would build from all of ``feeds()`` at once, holding one batch's
    tensors at a time; ``calibrator.compute_data()`` then gives the same ranges.  ``feeds`` is called twice and
    must yield the same batches both times."""
    from onnxruntime.quantization.calibrate import HistogramCollector

    if calibrator.method != "entropy":  # seeding a histogram over -t..t is what entropy's collector does
        raise ValueError(f"collect_histograms does not handle the '{calibrator.method}' calibration")
    session = calibrator.infer_session
    # in the session's output order, as ONNX Runtime fills (and later reports) the histograms
    index = [(i, o.name) for i, o in enumerate(session.get_outputs()) if o.name in calibrator.tensors_to_calibrate]
    extremes = _tensor_extremes(session, index, feeds())
    collector = HistogramCollector(method=calibrator.method, symmetric=calibrator.symmetric,
                                   num_bins=calibrator.num_bins, num_quantized_bins=calibrator.num_quantized_bins,
                                   percentile=calibrator.percentile, scenario=calibrator.scenario)
    for name, (mn, mx) in extremes.items():
        # ONNX Runtime's threshold expression, so the bin edges are bit-identical to its all-at-once histogram
        threshold = np.array(max(abs(mn), abs(mx)), dtype=np.asarray(mn).dtype)
        hist, edges = np.histogram(np.empty(0, dtype=threshold.dtype), collector.num_bins,
                                   range=(-threshold, threshold))
        collector.histogram_dict[name] = (hist, edges, mn, mx, threshold)
    # every batch's own threshold is within the seeded one, so ONNX Runtime's merge adds its counts in place
    for feed in feeds():
        values = session.run(None, feed)
        collector.collect({name: [values[i]] for i, name in index})
        del values  # before the next batch is computed: one batch in memory, not two
    calibrator.collector = collector


def _entropy_threshold(job: tuple[tuple, dict]) -> tuple:
    """ONNX Runtime's threshold search for one histogram, in a worker process."""
    from onnxruntime.quantization.calibrate import HistogramCollector

    histogram, settings = job
    return HistogramCollector(**settings).get_entropy_threshold(histogram, settings["num_quantized_bins"])


def entropy_ranges(collector: Any, workers: int) -> Any:
    """What ``compute_data()`` of an entropy calibrator whose histograms ``collector`` holds returns (ONNX
    Runtime's ``TensorsData``: per tensor its thresholds, histogram and bin edges), with the per-tensor threshold
    searches spread over ``workers`` processes (in this process when ``workers`` <= 1 or there is one tensor)."""
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import TensorsData

    if collector.method != "entropy":
        raise ValueError(f"entropy_ranges does not handle the '{collector.method}' calibration")
    settings = {"method": "entropy", "symmetric": collector.symmetric, "num_bins": collector.num_bins,
                "num_quantized_bins": collector.num_quantized_bins, "percentile": collector.percentile,
                "scenario": collector.scenario}
    names = list(collector.histogram_dict)
    jobs = [(collector.histogram_dict[n], settings) for n in names]
    if workers <= 1 or len(jobs) <= 1:
        found = [_entropy_threshold(job) for job in jobs]
    else:
        # spawned, not forked: the parent holds torch's and ONNX Runtime's thread pools
        pool = ProcessPoolExecutor(min(workers, len(jobs)), mp_context=multiprocessing.get_context("spawn"))
        try:
            found = list(pool.map(_entropy_threshold, jobs, chunksize=max(1, len(jobs) // (4 * workers))))
        finally:  # an interrupted run does not wait for the searches not yet started
            pool.shutdown(wait=True, cancel_futures=True)
    return TensorsData(CalibrationMethod.Entropy, {name: (*threshold, *collector.histogram_dict[name][:2])
                                                   for name, threshold in zip(names, found, strict=True)})
