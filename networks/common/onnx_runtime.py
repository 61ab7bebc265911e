"""Evaluate / inference from an exported ONNX file with ONNX Runtime: the parts every network shares.

A network's ``evaluate`` / ``inference`` section names what to run with exactly one of :data:`ONNX_SOURCES`
(:func:`check_model_source`, called at spec load so ``--dry-run`` refuses a bad combination).  An ONNX file is
read without its weights by :func:`describe_onnx` (inputs, shapes, outputs) so a network can check it against
its own export contract before any session starts.  :class:`OnnxSession` wraps the ONNX Runtime session: the
execution providers, a fixed graph batch size (run in chunks, the last one completed by repeating its first row),
the resize of each image's un-padded part to the graph's static H×W, and the ``runtime`` record that
metrics.json / status.json carry.
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from networks.common.errors import ConfigError

__all__ = ["ONNX_SOURCES", "OnnxGraphInfo", "OnnxSession", "check_model_source", "choose_providers",
           "describe_onnx", "has_fp16", "inference_session", "is_qdq_onnx", "onnx_file_of", "resolve_onnx_path",
           "run_session_options", "sessions_take_run_threads", "static_image_hw"]

log = logging.getLogger(__name__)

#: The keys of an evaluate/inference section that name what to run; exactly one must be set.
ONNX_SOURCES = ("checkpoint", "onnx_file", "trt_engine")


def _is_set(value: Any) -> bool:
    return value not in (None, "")


def onnx_file_of(cfg: Any, action: str | None, key: str = "onnx_file") -> str | None:
    """``<action>.<key>`` (one of :data:`ONNX_SOURCES`, default ``onnx_file``) when ``action`` is
    evaluate/inference and it is set, else None."""
    if action not in ("evaluate", "inference") or action not in cfg:
        return None
    value = cfg[action].get(key)
    return str(value) if _is_set(value) else None


def check_model_source(cfg: Any, action: str, check_file: Callable[[str, str], Any]) -> None:
    """Exactly one of ``<action>.checkpoint`` / ``onnx_file`` / ``trt_engine`` (one-line :class:`ConfigError`
    naming the three keys otherwise); a set ``onnx_file`` is passed to ``check_file(path, field)``, the network's
    own check of its export contract."""
    section = cfg[action]
    keys = [f"{action}.{k}" for k in ONNX_SOURCES]
    given = [f"{action}.{k}" for k in ONNX_SOURCES if _is_set(section.get(k))]
    if len(given) != 1:
        what = "none is set" if not given else f"{' and '.join(given)} are set"
        raise ConfigError(action, f"set exactly one of {', '.join(keys)}; {what}",
                          f"e.g. {action}.checkpoint=/path/to/model.pth or {action}.onnx_file=/path/to/model.onnx")
    if _is_set(section.get("onnx_file")):
        check_file(str(section.onnx_file), f"{action}.onnx_file")


@dataclass(frozen=True)
class OnnxGraphInfo:
    """Graph inputs in order (name → shape of ints, or the symbolic name of a dynamic axis) and output names."""

    inputs: dict[str, tuple[int | str, ...]]
    output_names: tuple[str, ...]

    @property
    def input_name(self) -> str:
        """The first input's name (the image of every tao-cli export)."""
        return next(iter(self.inputs))

    @property
    def input_shape(self) -> tuple[int | str, ...]:
        return self.inputs[self.input_name]


def resolve_onnx_path(path: str | os.PathLike) -> Path:
    return Path(os.path.expanduser(str(path))).resolve()


def describe_onnx(path: str | os.PathLike, field: str) -> OnnxGraphInfo:
    """Read the graph's inputs/outputs without the weights; one-line :class:`ConfigError` on ``field`` for a
    missing or unreadable file."""
    p = Path(os.path.expanduser(str(path)))
    if not p.is_file():
        raise ConfigError(field, f"{path} does not exist", "point it at the .onnx file written by the export action")
    try:
        import onnx

        model = onnx.load(str(p), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - any parse failure is the user's file, said in one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(field, f"{path} is not a readable ONNX file ({first[:200]})") from None
    inits = {i.name for i in model.graph.initializer}
    inputs = {i.name: tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                            for d in i.type.tensor_type.shape.dim)
              for i in model.graph.input if i.name not in inits}
    return OnnxGraphInfo(inputs, tuple(o.name for o in model.graph.output))


def static_image_hw(info: OnnxGraphInfo, path: Any, field: str, name: str | None = None) -> tuple[int, int]:
    """(H, W) of the image input ``name`` (default: the first), which must be [B, 3, H, W] with static H and W;
    one-line :class:`ConfigError` on ``field`` otherwise."""
    name = name or info.input_name
    shape = info.inputs[name]
    if len(shape) != 4:
        raise ConfigError(field, f"{path}: input '{name}' has shape {list(shape)}, expected [B, 3, H, W]")
    if shape[1] != 3:
        raise ConfigError(field, f"{path}: input '{name}' has {shape[1]} channels, expected 3 (RGB)")
    if not all(isinstance(d, int) and d > 0 for d in shape[2:]):
        raise ConfigError(field, f"{path}: input height/width {list(shape[2:])} must be static",
                          "export with export.input_height/input_width")
    return int(shape[2]), int(shape[3])


def choose_providers(want_gpu: bool) -> list[str]:
    """CUDA then CPU when ``want_gpu`` and this onnxruntime build has the CUDA provider; else CPU only."""
    import onnxruntime as ort

    if want_gpu and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def is_qdq_onnx(path: str | os.PathLike) -> bool:
    """True when the ONNX graph (or one of its functions) has QuantizeLinear/DequantizeLinear nodes."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    graphs = [model.graph, *(f for f in model.functions)]
    return any(node.op_type in ("QuantizeLinear", "DequantizeLinear") for g in graphs for node in g.node)


def has_fp16(path: str | os.PathLike) -> bool:
    """True when the ONNX graph holds fp16 weights or casts to fp16 (ModelOpt's QDQ file for a GPU converts the
    layers it leaves un-quantized to fp16)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    fp16 = onnx.TensorProto.FLOAT16
    return any(t.data_type == fp16 for t in model.graph.initializer) or any(
        node.op_type == "Cast" and any(a.name == "to" and a.i == fp16 for a in node.attribute)
        for node in model.graph.node)


def run_session_options() -> Any:
    """``onnxruntime.SessionOptions`` whose intra-op pool has this run's thread count: the engine set torch's from
    the plan (``OMP_NUM_THREADS``, the cores this process may use, its share among the processes of the node, the
    DataLoader workers: tao_cli/engine/threads.py).  ONNX Runtime's own default, one thread per physical core,
    follows none of them and pins its threads past the process's CPU affinity (measured: under ``taskset -c 0``
    a default session still ran on both cores of this machine, a session given 1 thread on one)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    return options


@contextlib.contextmanager
def sessions_take_run_threads() -> Iterator[None]:
    """Within the block, every ``onnxruntime.SessionOptions()`` starts with this run's intra-op thread count (see
    :func:`run_session_options`), for code that makes its sessions itself (ONNX Runtime's calibrators, ModelOpt);
    its own settings still apply on top.  ``onnxruntime.SessionOptions`` is put back on exit."""
    import onnxruntime as ort

    real = ort.SessionOptions
    threads = torch.get_num_threads()

    def with_threads(*args: Any, **kwargs: Any) -> Any:
        options = real(*args, **kwargs)
        options.intra_op_num_threads = threads
        return options

    ort.SessionOptions = with_threads
    try:
        yield
    finally:
        ort.SessionOptions = real


def inference_session(path: str | os.PathLike, providers: list[str], options: Any = None,
                      qdq: bool | None = None) -> Any:
    """An ``onnxruntime.InferenceSession`` of ``path``.  For a QDQ graph (``qdq``; None: read the file to tell)
    ONNX Runtime's ``MatMulAddFusion`` is turned off: on a static-shape graph it turns MatMul + Add into Gemm
    before the QDQ fusions run, and the Gemm then runs in fp32 with its weights dequantized at every call (int8
    slower than fp32).  An fp16 QDQ graph on the CPU provider is optimized at most at the extended level: ONNX
    Runtime 1.31's full level (its CPU layout transforms) crashed the process with a segmentation fault on
    ModelOpt's fp16 file."""
    import onnxruntime as ort

    qdq = is_qdq_onnx(path) if qdq is None else qdq
    disabled = ["MatMulAddFusion"] if qdq else None
    if qdq and providers and providers[0] == "CPUExecutionProvider" and has_fp16(path):
        options = options if options is not None else ort.SessionOptions()
        if options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL:
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    return ort.InferenceSession(str(path), options, providers=providers, disabled_optimizers=disabled)


class OnnxSession:
    """An ONNX Runtime session over a checked export ``info`` (from the network's own check of ``path``).

    :attr:`hw` is the static (H, W) of the image input, :attr:`batch` the graph's fixed batch size (None when
    dynamic).  :meth:`run` takes ``{input name: array}`` of any batch size and returns ``{output name: array}``.
    """

    def __init__(self, path: str | os.PathLike, info: OnnxGraphInfo, want_gpu: bool = False,
                 field: str = "onnx_file"):
        import onnxruntime as ort

        self.path = str(resolve_onnx_path(path))
        self.info = info
        self.hw = static_image_hw(info, path, field)
        batch = info.input_shape[0]
        self.batch = int(batch) if isinstance(batch, int) and batch > 0 else None
        options = run_session_options()
        self.threads = options.intra_op_num_threads
        self.session = inference_session(self.path, choose_providers(want_gpu), options)
        self.input_name = info.input_name
        self.input_names = list(info.inputs)
        self.output_names = list(info.output_names)
        self.providers = list(self.session.get_providers())
        self.version = ort.__version__
        self._warned_resize = False

    def describe(self) -> dict[str, Any]:
        """What ran, for the log and metrics.json: runtime, version, providers, ONNX path, input size, intra-op
        threads."""
        return {"name": "onnxruntime", "version": self.version, "providers": self.providers,
                "onnx_file": self.path, "input_hw": list(self.hw), "intra_op_threads": self.threads}

    def log_start(self, logger: logging.Logger) -> None:
        logger.info("Running %s with onnxruntime %s (providers %s), input %dx%d, %d intra-op thread(s)", self.path,
                    self.version, ", ".join(self.providers), *self.hw, self.threads)

    def prepare_images(self, images: torch.Tensor, image_sizes: list, hint: str) -> np.ndarray:
        """float32 [B, 3, H, W] image input: each image's un-padded part (``image_sizes`` (h, w)), resized
        bilinearly to :attr:`hw` when it has another size (warned once, with ``hint`` saying which spec fields
        make the sizes match)."""
        out = []
        for i, (h, w) in enumerate(image_sizes):
            x = images[i, :, : int(h), : int(w)].float()
            if (int(h), int(w)) != self.hw:
                if not self._warned_resize:
                    log.warning("Images are resized from the test size %dx%d to the ONNX input %dx%d; %s for "
                                "results identical to the checkpoint's", int(h), int(w), *self.hw, hint)
                    self._warned_resize = True
                x = F.interpolate(x[None], size=self.hw, mode="bilinear", align_corners=False)[0]
            out.append(x)
        return torch.stack(out).cpu().numpy().astype(np.float32, copy=False)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The session on ``feeds`` (all of one batch size), in chunks of a fixed graph batch size."""
        n_rows = next(iter(feeds.values())).shape[0]
        if self.batch is None:
            return dict(zip(self.output_names, self.session.run(self.output_names, feeds), strict=True))
        parts: dict[str, list[np.ndarray]] = {n: [] for n in self.output_names}
        for start in range(0, n_rows, self.batch):
            chunk = {k: v[start:start + self.batch] for k, v in feeds.items()}
            n = next(iter(chunk.values())).shape[0]
            if n < self.batch:  # a copy of a real row keeps every mask valid; its outputs are dropped
                chunk = {k: np.concatenate([v, np.repeat(v[:1], self.batch - n, axis=0)]) for k, v in chunk.items()}
            for name, arr in zip(self.output_names, self.session.run(self.output_names, chunk), strict=True):
                parts[name].append(arr[:n])
        return {n: np.concatenate(v) for n, v in parts.items()}
