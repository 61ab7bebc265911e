"""TensorRT: build an engine from an exported ONNX file (``gen_trt_engine``) and run one (``trt_engine``).

Written against the TensorRT 10 Python API (``tensorrt``) and CUDA through torch; neither is needed to import this
module.  :func:`require_tensorrt` is the one place that says what is missing, so a spec that asks for an engine
on a machine without TensorRT or a GPU fails at load (``--dry-run`` exit 2) with one line.

Contracts:

* :func:`build_engine` parses the ONNX file, sets the workspace pool, FP16 when asked, one optimization profile
  for the batch axis of every input (min/opt/max; a static batch must lie in that range), forces to fp32 the
  layers the network's ``fp32_select`` picks from all layer names (TAO's ``set_layer_precisions``: the same
  selection as the network's quantize exclusions) and applies the user's ``layers_precision`` entries
  (``"<layer name>:fp32|fp16"``, which win), and reads/writes a timing cache.  A QDQ ONNX
  (``QuantizeLinear``/``DequantizeLinear`` nodes, written by ``quantize`` with ``quantize.device=trt``: int8 with
  zero point 0, :func:`qdq_tensorrt_problem`) is built strongly typed: its precisions are the file's, so FP16
  and per-layer precisions do not apply.  The engine file is written atomically.
* :class:`TrtSession` has the interface of :class:`networks.common.onnx_runtime.OnnxSession` that the evaluate and
  inference paths use (``hw``, ``batch``, ``input_names``, ``output_names``, ``prepare_images``, ``run``,
  ``describe``, ``log_start``): ``run({input name: array}) -> {output name: array}`` on the GPU, in chunks of the
  engine profile's largest batch.
"""
from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from networks.common.errors import ConfigError
from networks.common.io import atomic_write_bytes
from networks.common.onnx_runtime import is_qdq_onnx, resolve_onnx_path

__all__ = ["LAYER_PRECISIONS", "MIN_TENSORRT_MAJOR", "LayerPrecision", "require_tensorrt", "tensorrt_missing",
           "parse_layers_precision", "is_qdq_onnx", "qdq_tensorrt_problem",
           "batch_range", "build_engine", "TrtSession", "check_gen_trt_engine", "run_gen_trt_engine",
           "select_gpu"]

log = logging.getLogger(__name__)

#: ``layers_precision`` values TAO's ``tensorrt.data_type`` allows (lower case in the entries).
LAYER_PRECISIONS = ("fp32", "fp16")

#: Layer kinds TAO's builder never forces: they carry shapes, indices or copies, not arithmetic.
_SKIPPED_LAYER_KINDS = ("CONCATENATION", "GATHER", "SHAPE", "CONSTANT", "SHUFFLE", "SLICE", "IDENTITY", "CAST")


@dataclass(frozen=True)
class LayerPrecision:
    """One ``layers_precision`` entry: the exact TensorRT layer ``name`` and its ``precision`` (fp32 | fp16)."""

    name: str
    precision: str


#: Oldest TensorRT major version this module's API calls exist in (strongly typed networks, ``execute_async_v3``
#: and name-based I/O; TensorRT 8 also needs an explicit-batch flag for ONNX that 10 no longer takes).
MIN_TENSORRT_MAJOR = 10


def tensorrt_missing() -> list[str]:
    """What this machine lacks to build or run a TensorRT engine: the ``tensorrt`` package (version
    :data:`MIN_TENSORRT_MAJOR` or newer), a CUDA GPU (empty when it has both; tests that need TensorRT skip on
    ``tensorrt_missing()``)."""
    missing = []
    if importlib.util.find_spec("tensorrt") is None:
        missing.append("the tensorrt Python package (pip install tensorrt, matching your CUDA)")
    else:
        import tensorrt

        version = str(getattr(tensorrt, "__version__", "unknown"))
        major = version.split(".")[0]
        if not major.isdigit() or int(major) < MIN_TENSORRT_MAJOR:
            missing.append(f"TensorRT {MIN_TENSORRT_MAJOR} or newer (this machine has tensorrt {version}; "
                           f"pip install 'tensorrt>={MIN_TENSORRT_MAJOR}')")
    import torch

    if not torch.cuda.is_available():
        missing.append("a CUDA GPU visible to torch")
    return missing


def require_tensorrt(field: str, *, want: str = "build or run a TensorRT engine") -> None:
    """One-line :class:`ConfigError` on ``field`` when the ``tensorrt`` package or a CUDA GPU is missing."""
    missing = tensorrt_missing()
    if missing:
        raise ConfigError(field, f"to {want} tao-cli needs " + " and ".join(missing),
                          "run on a GPU machine with TensorRT, or use the ONNX file with onnx_file=")


def parse_layers_precision(entries: list[str] | tuple[str, ...], field: str) -> list[LayerPrecision]:
    """``["<layer name>:fp32", ...]`` → :class:`LayerPrecision` list; a bad entry is a one-line error on ``field``.

    The name is everything before the last ``:`` (TensorRT layer names may contain ``:``)."""
    out = []
    for entry in entries or []:
        name, sep, precision = str(entry).rpartition(":")
        precision = precision.strip().lower()
        if not sep or not name.strip() or precision not in LAYER_PRECISIONS:
            raise ConfigError(field, f"entry {entry!r} is not '<layer name>:<precision>' with a precision in "
                              f"{list(LAYER_PRECISIONS)}", "e.g. '/sem_seg_head/predictor/Add_3:fp32'")
        out.append(LayerPrecision(name.strip(), precision))
    return out


def qdq_tensorrt_problem(path: str | os.PathLike) -> str | None:
    """Why TensorRT cannot build the QDQ graph at ``path`` (None when it can, or when it has no Q/DQ):
    TensorRT takes only int8 Q/DQ with zero point 0, and ``quantize`` writes uint8 activations with zero
    points unless ``quantize.device=trt``."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    consts = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2:
            zp = consts.get(node.input[2])
            if zp is None:
                continue
            if zp.data_type == onnx.TensorProto.UINT8:
                return f"{node.name or node.op_type} quantizes to uint8"
            if numpy_helper.to_array(zp).any():
                return f"{node.name or node.op_type} has a non-zero zero point"
    return None


def batch_range(min_batch: int, opt_batch: int, max_batch: int, onnx_batch: int | None, field: str
                ) -> tuple[int, int, int]:
    """(min, opt, max) of the engine's batch axis.  ``onnx_batch`` is the file's static batch (None = dynamic):
    then the profile is that batch, and a ``min/opt/max`` range that excludes it is an error."""
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise ConfigError(f"{field}.min_batch_size", f"needs min_batch_size <= opt_batch_size <= max_batch_size, "
                          f"got {min_batch}/{opt_batch}/{max_batch}")
    if onnx_batch is None:
        return min_batch, opt_batch, max_batch
    if not min_batch <= onnx_batch <= max_batch:
        raise ConfigError(f"{field}.max_batch_size", f"the ONNX file has a fixed batch of {onnx_batch}, outside "
                          f"min/max_batch_size {min_batch}..{max_batch}",
                          "export with export.batch_size=-1 for a dynamic batch, or set the batch sizes to it")
    return onnx_batch, onnx_batch, onnx_batch


@dataclass
class BuildReport:
    """What :func:`build_engine` did, for the log and status.json."""

    engine: str
    onnx_file: str
    data_type: str
    strongly_typed: bool
    batch: tuple[int, int, int]
    forced_fp32: list[str] = field(default_factory=list)
    user_precisions: dict[str, str] = field(default_factory=dict)
    timing_cache: str | None = None
    size_mb: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"trt_engine": self.engine, "onnx_file": self.onnx_file, "data_type": self.data_type,
                "strongly_typed": self.strongly_typed, "batch_min_opt_max": list(self.batch),
                "forced_fp32_layers": len(self.forced_fp32), "layers_precision": self.user_precisions,
                "timing_cache": self.timing_cache, "size_mb": round(self.size_mb, 2)}


def _trt_type(trt: Any, precision: str) -> Any:
    return {"fp32": trt.float32, "fp16": trt.float16}[precision]


def build_engine(onnx_file: str | os.PathLike, engine_file: str | os.PathLike, *, data_type: str = "FP32",
                 workspace_mb: int = 1024, batch: tuple[int, int, int] = (1, 1, 1),
                 fp32_select: Callable[[list[str]], Iterable[str]] | None = None, layers_precision: list[LayerPrecision] | None = None,
                 timing_cache: str | os.PathLike | None = None, verbose: bool = False) -> BuildReport:
    """Build and write a serialized engine (see the module docstring).  Raises :class:`ConfigError` naming the
    ONNX file when TensorRT cannot parse it or the build fails, and when a ``layers_precision`` name is not a
    layer of the parsed network."""
    import tensorrt as trt

    onnx_path = Path(onnx_file).expanduser().resolve()
    strongly_typed = is_qdq_onnx(onnx_path)
    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors)) or "no parser message"
        raise ConfigError("gen_trt_engine.onnx_file", f"TensorRT cannot parse {onnx_path}: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    report = BuildReport(str(Path(engine_file).expanduser().resolve()), str(onnx_path), data_type.upper(),
                         strongly_typed, batch)
    if not strongly_typed:
        if data_type.upper() == "FP16":
            config.set_flag(trt.BuilderFlag.FP16)
        wanted = {lp.name: lp.precision for lp in layers_precision or []}
        names = {network.get_layer(i).name for i in range(network.num_layers)}
        unknown = sorted(set(wanted) - names)
        if unknown:
            raise ConfigError("gen_trt_engine.tensorrt.layers_precision",
                              f"no layer named {unknown[0]!r} in the network parsed from {onnx_path}",
                              "take the names from a verbose build (gen_trt_engine.verbose=true)")
        skipped = {getattr(trt.LayerType, kind) for kind in _SKIPPED_LAYER_KINDS if hasattr(trt.LayerType, kind)}
        layers = [network.get_layer(i) for i in range(network.num_layers)]
        forced = set(fp32_select([layer.name for layer in layers])) if fp32_select else set()
        for layer in layers:
            precision = wanted.get(layer.name)
            if precision is None and layer.type not in skipped and layer.name in forced:
                precision = "fp32"
                report.forced_fp32.append(layer.name)
            if precision is None:
                continue
            layer.precision = _trt_type(trt, precision)
            for j in range(layer.num_outputs):
                if layer.get_output(j).dtype in (trt.float32, trt.float16):
                    layer.set_output_type(j, _trt_type(trt, precision))
        report.user_precisions = wanted
        if report.forced_fp32 or wanted:
            config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)

    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        rest = tuple(int(d) for d in tuple(tensor.shape))[1:]
        if any(d < 0 for d in rest):
            raise ConfigError("gen_trt_engine.onnx_file", f"input {tensor.name!r} of {onnx_path} has a dynamic "
                              f"axis other than the batch {tuple(tensor.shape)}",
                              "export with a static image size (export.input_height/input_width)")
        profile.set_shape(tensor.name, (batch[0], *rest), (batch[1], *rest), (batch[2], *rest))
    config.add_optimization_profile(profile)

    cache_path = Path(timing_cache).expanduser().resolve() if timing_cache else None
    if cache_path is not None:
        cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
        report.timing_cache = str(cache_path)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ConfigError("gen_trt_engine.onnx_file", f"TensorRT could not build an engine from {onnx_path}",
                          "rerun with gen_trt_engine.verbose=true for TensorRT's log")
    data = bytes(serialized)
    atomic_write_bytes(Path(report.engine), data)
    report.size_mb = len(data) / 2**20
    if cache_path is not None:
        atomic_write_bytes(cache_path, bytes(config.get_timing_cache().serialize()))
    log.info("Wrote %s (%.1f MB, %s%s, batch %d/%d/%d, %d layers forced to fp32)", report.engine, report.size_mb,
             report.data_type, ", strongly typed from a QDQ ONNX" if strongly_typed else "", *batch,
             len(report.forced_fp32))
    return report


class TrtSession:
    """A deserialized engine on ``cuda:<device>`` with the session interface of the ONNX path (module docstring).

    The image input is the engine's first input; its last two dimensions are :attr:`hw`.  :attr:`batch` is None:
    :meth:`run` splits a batch into chunks of the profile's largest batch itself.
    """

    def __init__(self, path: str | os.PathLike, field: str = "trt_engine", device: int = 0):
        require_tensorrt(field, want="run a TensorRT engine")
        import tensorrt as trt
        import torch

        self.path = str(Path(path).expanduser().resolve())
        if not Path(self.path).is_file():
            raise ConfigError(field, f"{self.path} does not exist", "build it with gen_trt_engine")
        self._trt, self._torch = trt, torch
        self.device = torch.device("cuda", device)
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(Path(self.path).read_bytes())
        if self.engine is None:
            raise ConfigError(field, f"{self.path} is not a TensorRT engine this TensorRT "
                              f"({trt.__version__}) can load", "rebuild it with gen_trt_engine on this machine")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.input_name = self.input_names[0]
        shape = tuple(self.engine.get_tensor_shape(self.input_name))
        self.hw = (int(shape[-2]), int(shape[-1]))
        self.max_batch = int(self.engine.get_tensor_profile_shape(self.input_name, 0)[2][0])
        self.batch = None
        self.version = trt.__version__
        self._warned_resize = False

    # the ONNX path's image preparation (resize to the engine's H×W, float32), shared rather than rewritten
    def prepare_images(self, images, image_sizes: list, hint: str) -> np.ndarray:
        from networks.common.onnx_runtime import OnnxSession

        return OnnxSession.prepare_images(self, images, image_sizes, hint)

    def describe(self) -> dict[str, Any]:
        return {"name": "tensorrt", "version": self.version, "trt_engine": self.path, "device": str(self.device),
                "input_hw": list(self.hw)}

    def log_start(self, logger: logging.Logger) -> None:
        logger.info("Running %s with TensorRT %s on %s, input %dx%d", self.path, self.version, self.device,
                    *self.hw)

    def _run_chunk(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch, trt = self._torch, self._trt
        keep = []
        for name in self.input_names:
            dtype = torch.from_numpy(np.empty(0, dtype=trt.nptype(self.engine.get_tensor_dtype(name)))).dtype
            t = torch.as_tensor(np.ascontiguousarray(feeds[name])).to(self.device, dtype).contiguous()
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
            keep.append(t)
        outs = {}
        for name in self.output_names:
            dtype = torch.from_numpy(np.empty(0, dtype=trt.nptype(self.engine.get_tensor_dtype(name)))).dtype
            outs[name] = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=dtype, device=self.device)
            self.context.set_tensor_address(name, outs[name].data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT failed to run {self.path}")
        stream.synchronize()
        return {n: v.cpu().numpy() for n, v in outs.items()}

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``{input name: array}`` (one batch size) → ``{output name: array}``, in chunks of the largest batch."""
        rows = next(iter(feeds.values())).shape[0]
        parts: dict[str, list[np.ndarray]] = {n: [] for n in self.output_names}
        for start in range(0, rows, self.max_batch):
            got = self._run_chunk({k: v[start:start + self.max_batch] for k, v in feeds.items()})
            for name in self.output_names:
                parts[name].append(got[name])
        return {n: np.concatenate(v) for n, v in parts.items()}


def _engine_batch(sec: Any, onnx_batch: int | None) -> tuple[int, int, int]:
    """The profile from ``gen_trt_engine.tensorrt``; ``gen_trt_engine.batch_size`` > 0 fixes all three (TAO: −1
    leaves the range to min/opt/max_batch_size)."""
    t = sec.tensorrt
    fixed = int(sec.batch_size)
    lo, opt, hi = (fixed, fixed, fixed) if fixed > 0 else (int(t.min_batch_size), int(t.opt_batch_size),
                                                           int(t.max_batch_size))
    return batch_range(lo, opt, hi, onnx_batch, "gen_trt_engine.tensorrt")


def select_gpu(gpu_id: int) -> None:
    """Make ``cuda:<gpu_id>`` torch's (and so TensorRT's) current device; one line when it does not exist."""
    import torch

    if not 0 <= int(gpu_id) < torch.cuda.device_count():
        raise ConfigError("gen_trt_engine.gpu_id", f"GPU {gpu_id} does not exist (this machine has "
                          f"{torch.cuda.device_count()})", "set gen_trt_engine.gpu_id to one of them")
    torch.cuda.set_device(int(gpu_id))


def check_gen_trt_engine(cfg: Any, check_onnx: Callable[[str, str], Any]) -> Any:
    """Load-time checks of ``gen_trt_engine`` (``--dry-run`` included): TensorRT and a GPU present, the
    ``layers_precision`` entries, the ONNX file (``check_onnx(path, field)``, the network's export check, which
    returns its :class:`~networks.common.onnx_runtime.OnnxGraphInfo`) and the batch range.  Returns the info."""
    sec = cfg.gen_trt_engine
    require_tensorrt("gen_trt_engine")
    parse_layers_precision(list(sec.tensorrt.layers_precision), "gen_trt_engine.tensorrt.layers_precision")
    info = check_onnx(str(sec.onnx_file), "gen_trt_engine.onnx_file")
    onnx_path = resolve_onnx_path(sec.onnx_file)
    problem = qdq_tensorrt_problem(onnx_path)
    if problem:
        raise ConfigError("gen_trt_engine.onnx_file", f"{onnx_path} is a QDQ file laid out for ONNX Runtime "
                          f"({problem}); TensorRT takes only int8 Q/DQ with zero point 0",
                          "quantize the fp32 export again with quantize.device=trt")
    first = info.input_shape[0]
    _engine_batch(sec, int(first) if isinstance(first, int) and first > 0 else None)
    return info


def run_gen_trt_engine(cfg: Any, ctx: Any, check_onnx: Callable[[str, str], Any],
                       fp32_select: Callable[[list[str]], Iterable[str]]) -> dict[str, Any]:
    """The ``gen_trt_engine`` action of a network: checks (:func:`check_gen_trt_engine`), builds
    ``gen_trt_engine.trt_engine`` from ``gen_trt_engine.onnx_file`` with the network's fp32 selection, writes
    ``gen_trt_engine_report.json`` in the run directory and returns the report for status.json."""
    from networks.common.context import run_output_dir
    from networks.common.io import atomic_write_json

    info = check_gen_trt_engine(cfg, check_onnx)
    sec = cfg.gen_trt_engine
    select_gpu(int(sec.gpu_id))
    first = info.input_shape[0]
    report = build_engine(
        sec.onnx_file, sec.trt_engine, data_type=str(sec.tensorrt.data_type),
        workspace_mb=int(sec.tensorrt.workspace_size),
        batch=_engine_batch(sec, int(first) if isinstance(first, int) and first > 0 else None),
        fp32_select=fp32_select,
        layers_precision=parse_layers_precision(list(sec.tensorrt.layers_precision),
                                                "gen_trt_engine.tensorrt.layers_precision"),
        timing_cache=sec.timing_cache or None, verbose=bool(sec.verbose)).as_dict()
    atomic_write_json(run_output_dir(ctx, "gen_trt_engine.results_dir") / "gen_trt_engine_report.json", report,
                      indent=2)
    return report
