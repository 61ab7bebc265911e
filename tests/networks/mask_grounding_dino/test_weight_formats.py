"""Mask Grounding DINO starts from the weights users have: tao-cli, TAO, IDEA GroundingDINO, Hugging Face, BERT dirs.

Proofs (offline, random-initialised references):

* **HF directory** — a tiny random ``GroundingDinoForObjectDetection`` (``test_hf_equivalence._tiny_hf``) written
  with ``save_pretrained`` (``model.safetensors``, and the same tensors as ``pytorch_model.bin``) is loaded through
  the train path (``MaskGDinoModule`` with ``train.pretrained_model_path``) and through the engine's path
  (``read_source`` → ``detect_format`` → ``load_converted``): final, per-layer and encoder-proposal logits and boxes
  equal HF's (1e-4); the report lists exactly the mask head as newly initialised; the text encoder comes from the
  HF directory (the spec's BERT directory holds other random weights).
* **IDEA .pth** — the same HF weights under IDEA GroundingDINO's names (``{"model": {"module.<key>": ...}}``, key
  set checked against :func:`gdino_key_shapes` with ``layout="idea"``) load through the train path with the same
  outputs.
* **TAO** — ``data/tao_mask_gdino_tiny_keys.json`` lists TAO's key names and shapes for
  ``configs/mask_grounding_dino/tiny.yaml`` (regenerate with ``python -m
  tests.networks.mask_grounding_dino.test_weight_formats``; a test checks it is what :func:`gdino_key_shapes`
  derives): a checkpoint with exactly those keys loads with zero missing and zero unexpected keys, and gives the
  same outputs as the same tensors loaded under our names.
* Wrong files (an HF Mask2Former directory, MAL checkpoints) are one-line errors; a BERT directory in every layout
  ``save_pretrained``/``torch.save`` produces works as ``model.text_encoder_type``.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from networks.backbones.swin import SwinTransformer  # noqa: E402
from networks.common.context import RunContext  # noqa: E402
from networks.common.errors import CheckpointError, ConfigError  # noqa: E402
from networks.common.weight_formats import detect_format, load_converted, read_source  # noqa: E402
from networks.mask_grounding_dino import NETWORK  # noqa: E402
from networks.mask_grounding_dino.convert import hf_to_ours_state_dict  # noqa: E402
from networks.mask_grounding_dino.model import build_model  # noqa: E402
from networks.mask_grounding_dino.module import MaskGDinoModule, load_full_weights  # noqa: E402
from networks.mask_grounding_dino.text_encoder import BertTextEncoder  # noqa: E402
from networks.mask_grounding_dino.weight_formats import formats  # noqa: E402
from tests.inspect_check import assert_inspect_names  # noqa: E402

from .conftest import REPO, make_tiny_cfg  # noqa: E402
from .test_hf_equivalence import MAX_TEXT_LEN, _hf_labels, _ours, _text_inputs, _tiny_hf  # noqa: E402

DATA = Path(__file__).parent / "data"
TAO_FIXTURE = DATA / "tao_mask_gdino_tiny_keys.json"
MASK_HEAD = ("controller.", "mask_head.")


# ---------------------------------------------------------------------------------------- key-list generator
def _bert_keys(bert_config, *, pooler: bool) -> dict[str, list[int]]:
    """``bert.<key>`` → shape of ``transformers.BertModel`` (the class TAO's and IDEA's ``get_pretrained_language_
    model`` instantiate; their ``BertModelWraper`` re-registers its ``embeddings``/``encoder``/``pooler``)."""
    from transformers import BertModel

    with torch.device("meta"):
        bert = BertModel(bert_config, add_pooling_layer=pooler)
    return {f"bert.{k}": list(v.shape) for k, v in bert.state_dict().items()}


def gdino_key_shapes(model: dict, bert_config, layout: str) -> dict[str, list[int]]:
    """Key → shape of a Grounding DINO checkpoint for the ``model`` sizes, derived from the original module code.

    ``model``: ``hidden_dim``, ``nheads``, ``num_queries``, ``enc_layers``, ``dec_layers``, ``dim_feedforward``,
    ``enc_n_points``, ``dec_n_points``, ``num_feature_levels``, ``return_interm_indices`` and ``swin`` =
    ``(embed_dim, depths, num_heads, window_size)``; two-stage "standard", shared decoder box head, no class-embed
    bias / learned log-scale, no denoising queries (TAO's defaults).

    * ``layout="tao"`` — TAO's Lightning checkpoint of Mask Grounding DINO (tao_pytorch_backend, ``nvidia_tao_
      pytorch/cv/``): ``pl_gdino_model.py`` holds ``MaskGDINOModel`` as ``model``, which holds ``MaskGroundingDINO``
      as ``model`` (``mask_grounding_dino/model/build_nn_model.py``) → prefix ``model.model.``.  The backbone is
      ``Joiner(Backbone)`` whose ``BackboneBase.body`` is the Swin (``grounding_dino/model/backbone.py``) →
      ``backbone.0.body.``; Swin names from ``backbone_v2/swin.py`` + ``swin_utils.py`` (``norm{i}`` per returned
      stage, ``head`` = Identity); a BERT pooler (``bertwraper.py``); the mask head of ``mask_groundingdino.py``
      (``controller`` MLP(d, d, params, 3), ``MaskHeadConv(d, None, d)`` of ``model_utils.py``).  No
      ``position_ids`` (non-persistent in the transformers TAO uses) and no ``label_enc`` (``dn_number`` 0).
    * ``layout="idea"`` — IDEA GroundingDINO's ``groundingdino/models/GroundingDINO/``: the same transformer and
      heads (``groundingdino.py``, ``transformer.py``, ``fuse_modules.py``), the Swin directly under ``backbone.0.``
      (``backbone.py``: ``Joiner(nn.Sequential)``), no mask head, and what released ``.pth`` files carry besides:
      ``bert.embeddings.position_ids`` and the DN ``label_enc`` (2000 + 1 labels).  Without the ``module.`` prefix.

    Int64 buffers (``relative_position_index``) are the only non-float entries.
    """
    d, ffn = int(model["hidden_dim"]), int(model["dim_feedforward"])
    nh, levels = int(model["nheads"]), int(model["num_feature_levels"])
    embed, depths, heads, window = model["swin"]
    out_idx = [i for i in model["return_interm_indices"] if i != 4]  # build_nn_model.py: index 4 is a conv
    keys: dict[str, list[int]] = {}

    def linear(name: str, n_in: int, n_out: int, bias: bool = True) -> None:
        keys[f"{name}.weight"] = [n_out, n_in]
        if bias:
            keys[f"{name}.bias"] = [n_out]

    def norm(name: str, n: int) -> None:
        keys[f"{name}.weight"] = [n]
        keys[f"{name}.bias"] = [n]

    def mlp(name: str, n_in: int, hidden: int, n_out: int, layers: int) -> None:  # dino/model/model_utils.py
        dims = [n_in] + [hidden] * (layers - 1) + [n_out]
        for i in range(layers):
            linear(f"{name}.layers.{i}", dims[i], dims[i + 1])

    def mha(name: str) -> None:  # torch.nn.MultiheadAttention
        keys[f"{name}.in_proj_weight"] = [3 * d, d]
        keys[f"{name}.in_proj_bias"] = [3 * d]
        linear(f"{name}.out_proj", d, d)

    def deform(name: str, points: int) -> None:  # deformable_detr/model/ops/gdino_modules.py
        linear(f"{name}.sampling_offsets", d, nh * levels * points * 2)
        linear(f"{name}.attention_weights", d, nh * levels * points)
        linear(f"{name}.value_proj", d, d)
        linear(f"{name}.output_proj", d, d)

    # transformer (mask_grounding_dino/model/transformer.py; IDEA transformer.py), registered first
    t = "transformer"
    for i in range(model["enc_layers"]):
        e = f"{t}.encoder.layers.{i}"  # DeformableTransformerEncoderLayer
        deform(f"{e}.self_attn", model["enc_n_points"])
        norm(f"{e}.norm1", d)
        linear(f"{e}.linear1", d, ffn)
        linear(f"{e}.linear2", ffn, d)
        norm(f"{e}.norm2", d)
    for i in range(model["enc_layers"]):
        e = f"{t}.encoder.text_layers.{i}"  # TransformerEncoderLayer(d, nhead // 2, ffn // 2)
        mha(f"{e}.self_attn")
        linear(f"{e}.linear1", d, ffn // 2)
        linear(f"{e}.linear2", ffn // 2, d)
        norm(f"{e}.norm1", d)
        norm(f"{e}.norm2", d)
    for i in range(model["enc_layers"]):
        e = f"{t}.encoder.fusion_layers.{i}"  # BiAttentionBlock(v_dim=d, l_dim=d, embed_dim=ffn // 2)
        norm(f"{e}.layer_norm_v", d)
        norm(f"{e}.layer_norm_l", d)
        for proj in ("v_proj", "l_proj", "values_v_proj", "values_l_proj"):
            linear(f"{e}.attn.{proj}", d, ffn // 2)
        linear(f"{e}.attn.out_v_proj", ffn // 2, d)
        linear(f"{e}.attn.out_l_proj", ffn // 2, d)
        keys[f"{e}.gamma_v"] = [d]
        keys[f"{e}.gamma_l"] = [d]
    for i in range(model["dec_layers"]):
        e = f"{t}.decoder.layers.{i}"  # DeformableTransformerDecoderLayer(use_text_cross_attention=True)
        deform(f"{e}.cross_attn", model["dec_n_points"])
        norm(f"{e}.norm1", d)
        mha(f"{e}.ca_text")
        norm(f"{e}.catext_norm", d)
        mha(f"{e}.self_attn")
        norm(f"{e}.norm2", d)
        linear(f"{e}.linear1", d, ffn)
        linear(f"{e}.linear2", ffn, d)
        norm(f"{e}.norm3", d)
    norm(f"{t}.decoder.norm", d)
    mlp(f"{t}.decoder.ref_point_head", 2 * d, d, d, 2)
    for i in range(model["dec_layers"]):  # GroundingDINO sets transformer.decoder.bbox_embed to its shared list
        mlp(f"{t}.decoder.bbox_embed.{i}", d, d, 4, 3)
    keys[f"{t}.level_embed"] = [levels, d]
    keys[f"{t}.tgt_embed.weight"] = [model["num_queries"], d]  # nn.Embedding
    linear(f"{t}.enc_output", d, d)
    norm(f"{t}.enc_output_norm", d)
    mlp(f"{t}.enc_out_bbox_embed", d, d, 4, 3)  # two_stage_bbox_embed_share False: a deepcopy

    if layout == "idea":
        keys["label_enc.weight"] = [2001, d]
    bert = _bert_keys(bert_config, pooler=True)
    if layout == "idea":
        bert["bert.embeddings.position_ids"] = [1, int(bert_config.max_position_embeddings)]
    keys.update(bert)
    linear("feat_map", int(bert_config.hidden_size), d)

    # Swin (backbone_v2/swin.py, swin_utils.py; IDEA backbone/swin_transformer.py)
    s = "backbone.0.body" if layout == "tao" else "backbone.0"
    keys[f"{s}.patch_embed.proj.weight"] = [embed, 3, 4, 4]
    keys[f"{s}.patch_embed.proj.bias"] = [embed]
    norm(f"{s}.patch_embed.norm", embed)
    for i, (depth, h) in enumerate(zip(depths, heads, strict=True)):
        dim = embed * 2 ** i
        for b in range(depth):
            k = f"{s}.layers.{i}.blocks.{b}"
            norm(f"{k}.norm1", dim)
            keys[f"{k}.attn.relative_position_bias_table"] = [(2 * window - 1) ** 2, h]
            keys[f"{k}.attn.relative_position_index"] = [window * window, window * window]
            linear(f"{k}.attn.qkv", dim, 3 * dim)
            linear(f"{k}.attn.proj", dim, dim)
            norm(f"{k}.norm2", dim)
            linear(f"{k}.mlp.fc1", dim, 4 * dim)
            linear(f"{k}.mlp.fc2", 4 * dim, dim)
        if i < len(depths) - 1:
            linear(f"{s}.layers.{i}.downsample.reduction", 4 * dim, 2 * dim, bias=False)
            norm(f"{s}.layers.{i}.downsample.norm", 4 * dim)
    for i in out_idx:
        norm(f"{s}.norm{i}", embed * 2 ** i)

    # input_proj (GroundingDINO.prepare_channel_mapper): 1x1 per returned stage, then 3x3 stride-2 convs
    chans = [embed * 2 ** i for i in out_idx]
    for lvl in range(levels):
        c_in = chans[lvl] if lvl < len(chans) else (chans[-1] if lvl == len(chans) else d)
        ksize = 1 if lvl < len(chans) else 3
        keys[f"input_proj.{lvl}.0.weight"] = [d, c_in, ksize, ksize]
        keys[f"input_proj.{lvl}.0.bias"] = [d]
        norm(f"input_proj.{lvl}.1", d)  # GroupNorm(32, d)
    for i in range(model["dec_layers"]):
        mlp(f"bbox_embed.{i}", d, d, 4, 3)  # class_embed: ContrastiveEmbed without parameters

    if layout == "tao":  # MaskGroundingDINO's mask branch (has_mask)
        c = d // 32
        params = (c + 2) * 8 + 8 + 8 * 8 + 8 + 8 * 1 + 1  # rel_coord, 8 dynamic channels, 3 layers
        mlp("controller", d, d, params, 3)
        for name, (c_out, c_in) in {"lay1": (d // 4, d), "lay2": (d // 32, d // 4), "lay3": (d, d),
                                    "lay4": (d, d), "jia_dcn": (d, d)}.items():
            keys[f"mask_head.{name}.weight"] = [c_out, c_in, 3, 3]
            keys[f"mask_head.{name}.bias"] = [c_out]
        return {f"model.model.{k}": v for k, v in keys.items()}
    return keys


def _tiny_spec():
    """configs/mask_grounding_dino/tiny.yaml, merged over the schema defaults."""
    from omegaconf import OmegaConf

    from networks.mask_grounding_dino.config import ExperimentConfig

    return OmegaConf.merge(OmegaConf.structured(ExperimentConfig),
                           OmegaConf.load(REPO / "configs" / "mask_grounding_dino" / "tiny.yaml"))


def _model_sizes(m) -> dict:
    from networks.mask_grounding_dino.weight_formats import _spec_swin

    names = ("hidden_dim", "nheads", "num_queries", "enc_layers", "dec_layers", "dim_feedforward", "enc_n_points",
             "dec_n_points", "num_feature_levels")
    sizes = {n: int(m[n]) for n in names}
    sizes["return_interm_indices"] = [int(i) for i in m["return_interm_indices"]]
    sizes["swin"] = _spec_swin(m)
    return sizes


def tao_fixture() -> dict:
    """The content of ``data/tao_mask_gdino_tiny_keys.json``: TAO's keys and shapes for the tiny spec."""
    from transformers import BertConfig

    from networks.mask_grounding_dino.text_encoder import resolve_text_encoder

    m = _tiny_spec().model
    bert = BertConfig.from_pretrained(str(resolve_text_encoder(m.text_encoder_type)), local_files_only=True)
    return {"generator": "tests/networks/mask_grounding_dino/test_weight_formats.py:gdino_key_shapes(layout='tao')",
            "spec": "configs/mask_grounding_dino/tiny.yaml",
            "keys": gdino_key_shapes(_model_sizes(m), bert, "tao")}


# ---------------------------------------------------------------------------------------------------- TAO
def test_tao_fixture_is_what_the_generator_derives():
    stored = json.loads(TAO_FIXTURE.read_text())
    assert stored == tao_fixture()
    keys = stored["keys"]
    assert len(keys) == 396 and all(k.startswith("model.model.") for k in keys)
    assert keys["model.model.backbone.0.body.layers.0.blocks.0.attn.qkv.weight"] == [96, 32]
    assert keys["model.model.controller.layers.2.weight"] == [(2 + 2) * 8 + 8 + 64 + 8 + 8 + 1, 64]
    assert "model.model.bert.pooler.dense.weight" in keys


def _index(shape) -> torch.Tensor:
    from networks.backbones.swin import WindowAttention

    return WindowAttention(1, int(round(shape[0] ** 0.5)), 1).relative_position_index


def _tiny_inputs(size: int = 128):
    enc, block, pos = _text_inputs(["circle . square .", "triangle ."])
    torch.manual_seed(11)
    images = torch.randn(2, 3, size, size)
    pixel_mask = torch.ones(2, size, size, dtype=torch.bool)
    pixel_mask[1, size * 3 // 4:, :] = False
    return images, pixel_mask, enc, block, pos


def _run(model, inputs):
    images, pixel_mask, enc, block, pos = inputs
    model.eval()
    with torch.no_grad():
        return model(images, pixel_mask, enc["input_ids"], enc["attention_mask"], pos, enc["token_type_ids"], block)


def test_tao_checkpoint_loads_with_no_missing_or_unexpected_key(tmp_path):
    keys = json.loads(TAO_FIXTURE.read_text())["keys"]
    torch.manual_seed(0)
    tao = {k: _index(shape) if k.endswith("relative_position_index") else torch.randn(shape) * 0.05
           for k, shape in keys.items()}
    path = tmp_path / "tao_mgdino.pth"
    torch.save({"state_dict": tao, "epoch": 3, "global_step": 30, "pytorch-lightning_version": "2.4.0"}, path)

    spec = _tiny_spec()
    torch.manual_seed(1)
    via_format = build_model(spec)
    assert_inspect_names(path, "mask_grounding_dino", "tao")
    source = read_source(path, field="evaluate.checkpoint")
    fmt = detect_format(source, NETWORK.weight_formats(), field="evaluate.checkpoint")
    assert fmt.name == "tao"
    report = load_converted(via_format, source, fmt, spec.model)
    assert report.missing == [] and report.unexpected == [] and report.mismatched == []
    assert report.loaded == len(via_format.state_dict())
    assert sorted(report.benign) == ["bert.pooler.dense.bias", "bert.pooler.dense.weight"]

    torch.manual_seed(2)
    by_name = build_model(spec)
    ours = {k[len("model.model."):]: v for k, v in tao.items() if ".pooler." not in k}
    by_name.load_state_dict(ours, strict=True)
    inputs = _tiny_inputs()
    a, b = _run(via_format, inputs), _run(by_name, inputs)
    for key in ("pred_logits", "pred_boxes", "pred_masks"):
        assert torch.equal(a[key], b[key]), key
    assert a["pred_boxes"].std() > 1e-3


# ---------------------------------------------------------------------------------------------------- HF
@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """The tiny HF model, its reference outputs, and three directories: ``safetensors`` / ``bin`` (the same weights
    saved both ways) and ``bert`` (a BERT of the same shape with *other* random weights, used as the spec's
    ``model.text_encoder_type``)."""
    from safetensors.torch import load_file
    from transformers import BertModel

    hf, cfg = _tiny_hf()
    root = tmp_path_factory.mktemp("hf_gdino")
    hf.save_pretrained(root / "safetensors")
    bin_dir = root / "bin"
    hf.save_pretrained(bin_dir)
    tensors = load_file(str(bin_dir / "model.safetensors"))
    (bin_dir / "model.safetensors").unlink()
    torch.save(tensors, bin_dir / "pytorch_model.bin")
    torch.manual_seed(99)
    BertModel(cfg.text_config, add_pooling_layer=False).save_pretrained(root / "bert")

    enc, block, pos = _text_inputs(["cat . dog . remote control .", "a person ."])
    torch.manual_seed(1)
    images = torch.randn(2, 3, 128, 128)
    pixel_mask = torch.ones(2, 128, 128, dtype=torch.long)
    pixel_mask[1, 96:, :] = 0
    pixel_mask[1, :, 112:] = 0
    with torch.no_grad():
        ref = hf(pixel_values=images, input_ids=enc["input_ids"], token_type_ids=enc["token_type_ids"],
                 attention_mask=enc["attention_mask"], pixel_mask=pixel_mask, labels=_hf_labels())
    inputs = (images, pixel_mask.bool(), enc, block, pos)
    return {"hf": hf, "cfg": cfg, "ref": ref, "inputs": inputs, "root": root, "sd": hf.state_dict()}


def _hf_spec(mgd_synthetic, bert_dir: Path, **overrides):
    """The tiny spec with the model section of ``test_hf_equivalence._tiny_hf`` (text encoder: ``bert_dir``)."""
    cfg = make_tiny_cfg(mgd_synthetic)
    m = cfg.model
    m.backbone = "swin_custom"
    m.swin.embed_dim, m.swin.depths, m.swin.num_heads = 32, [1, 1, 2, 1], [1, 2, 4, 8]
    m.swin.window_size, m.swin.drop_path_rate = 2, 0.0
    m.text_encoder_type = str(bert_dir)
    m.hidden_dim, m.nheads, m.num_queries, m.num_select = 64, 4, 12, 12
    m.enc_layers, m.dec_layers, m.dim_feedforward = 2, 3, 128
    m.max_text_len, m.num_feature_levels, m.return_interm_indices = MAX_TEXT_LEN, 4, [1, 2, 3, 4]
    m.dropout_ratio = 0.0
    for key, value in overrides.items():
        m[key] = value
    return cfg


def _max_diff_to_hf(out: dict, ref) -> float:
    """max |Δ| over the final, every auxiliary and the encoder-proposal logits (finite entries, same -inf pattern)
    and boxes; asserts the references are not degenerate."""
    pairs = [(out["pred_logits"], ref.logits), (out["pred_boxes"], ref.pred_boxes),
             (out["interm_outputs"]["pred_boxes"], ref.encoder_pred_boxes)]
    assert len(out["aux_outputs"]) == len(ref.auxiliary_outputs) == 2
    for ours_l, ref_l in zip(out["aux_outputs"], ref.auxiliary_outputs, strict=True):
        pairs += [(ours_l["pred_logits"], ref_l["logits"]), (ours_l["pred_boxes"], ref_l["pred_boxes"])]
    worst = 0.0
    for ours, theirs in pairs:
        assert ours.shape == theirs.shape
        finite = torch.isfinite(theirs)
        assert torch.equal(finite, torch.isfinite(ours)) and finite.any()
        assert theirs[finite].std() > 1e-3
        worst = max(worst, (ours[finite] - theirs[finite]).abs().max().item())
    return worst


def _mask_head_keys(model) -> list[str]:
    return sorted(k for k in model.state_dict() if k.startswith(MASK_HEAD))


@pytest.mark.parametrize("container", ["safetensors", "bin"])
def test_hf_directory_through_the_train_path(container, hf_dirs, mgd_synthetic, tmp_path, caplog):
    cfg = _hf_spec(mgd_synthetic, hf_dirs["root"] / "bert")
    cfg.train.pretrained_model_path = str(hf_dirs["root"] / container)
    with caplog.at_level(logging.INFO):
        module = MaskGDinoModule(cfg, RunContext("train", tmp_path))
    assert "controller/mask_head" in caplog.text and "newly initialised" in caplog.text
    assert f"({'hf'}:" in caplog.text
    worst = _max_diff_to_hf(_run(module.model, hf_dirs["inputs"]), hf_dirs["ref"])
    print(f"HF {container} dir via train.pretrained_model_path: max |diff| = {worst:.2e}")
    assert worst <= 1e-4
    # the text encoder came from the HF directory, not from model.text_encoder_type's random weights
    hf_word = hf_dirs["sd"]["model.text_backbone.embeddings.word_embeddings.weight"]
    assert torch.equal(module.model.bert.embeddings.word_embeddings.weight, hf_word)


@pytest.mark.parametrize("container", ["safetensors", "bin"])
def test_hf_directory_through_the_engine_path(container, hf_dirs, mgd_synthetic):
    cfg = _hf_spec(mgd_synthetic, hf_dirs["root"] / "bert")
    source = read_source(hf_dirs["root"] / container, field="evaluate.checkpoint")
    assert source.container == "hf-dir"
    assert_inspect_names(hf_dirs["root"] / container, "mask_grounding_dino", "hf")
    fmt = detect_format(source, NETWORK.weight_formats(), field="evaluate.checkpoint")
    assert fmt.name == "hf" and fmt.part == "model"
    torch.manual_seed(5)
    model = build_model(cfg)
    report = load_converted(model, source, fmt, cfg.model)
    assert sorted(report.missing) == _mask_head_keys(model) and len(report.missing) == 16
    assert not report.unexpected and not report.mismatched
    worst = _max_diff_to_hf(_run(model, hf_dirs["inputs"]), hf_dirs["ref"])
    print(f"HF {container} dir via read_source/detect_format/load_converted: max |diff| = {worst:.2e}")
    assert worst <= 1e-4

    # what `export` and the engine's evaluate/inference load with (export.checkpoint / evaluate.checkpoint)
    from networks.mask_grounding_dino.export import load_model_weights
    from networks.mask_grounding_dino.module import MaskGDinoModule
    from tao_cli.engine.actions import load_into

    torch.manual_seed(6)
    model = build_model(cfg)
    load_model_weights(model, hf_dirs["root"] / container, model_cfg=cfg.model)
    assert _max_diff_to_hf(_run(model, hf_dirs["inputs"]), hf_dirs["ref"]) <= 1e-4
    torch.manual_seed(7)
    module = MaskGDinoModule(cfg)
    load_into(module, hf_dirs["root"] / container, None, "mask_grounding_dino", model_cfg=cfg.model,
              field="evaluate.checkpoint")
    assert _max_diff_to_hf(_run(module.model, hf_dirs["inputs"]), hf_dirs["ref"]) <= 1e-4


@pytest.mark.parametrize(("override", "field"), [({"num_queries": 10}, "num_queries"),
                                                 ({"hidden_dim": 96}, "hidden_dim"),
                                                 ({"dec_layers": 2}, "dec_layers")])
def test_hf_config_that_differs_from_the_spec_is_named(override, field, hf_dirs, mgd_synthetic):
    cfg = _hf_spec(mgd_synthetic, hf_dirs["root"] / "bert", **override)
    model = _ours(hf_dirs["cfg"])
    with pytest.raises(CheckpointError) as err:
        load_full_weights(model, hf_dirs["root"] / "safetensors", model_cfg=cfg.model)
    text = err.value.one_line()
    assert f"model.{field}" in text and "\n" not in text


def test_hf_swin_and_text_encoder_that_differ_are_named(hf_dirs, mgd_synthetic, tmp_path):
    from transformers import BertConfig, BertModel

    cfg = _hf_spec(mgd_synthetic, hf_dirs["root"] / "bert")
    cfg.model.swin.window_size = 4
    with pytest.raises(CheckpointError, match="window_size=2 differs"):
        load_full_weights(_ours(hf_dirs["cfg"]), hf_dirs["root"] / "safetensors", model_cfg=cfg.model)
    other = BertConfig(**{**hf_dirs["cfg"].text_config.to_dict(), "num_hidden_layers": 1})
    BertModel(other, add_pooling_layer=False).save_pretrained(tmp_path / "bert1")
    cfg = _hf_spec(mgd_synthetic, tmp_path / "bert1")
    with pytest.raises(CheckpointError, match="num_hidden_layers=2 differs from 1 of model.text_encoder_type"):
        load_full_weights(_ours(hf_dirs["cfg"]), hf_dirs["root"] / "safetensors", model_cfg=cfg.model)


# --------------------------------------------------------------------------------------------------- IDEA
def _idea_state_dict(hf_sd, model) -> dict[str, torch.Tensor]:
    """The HF weights under IDEA GroundingDINO's names, as a released ``.pth`` holds them.

    HF → our names by the converter the equivalence test proves; ours → IDEA by IDEA's module structure (see
    :func:`gdino_key_shapes`): ``backbone.0.body.<swin>`` → ``backbone.0.<swin>``, everything else unchanged, no
    mask head; plus the entries a release carries that HF drops (Swin index buffers, BERT pooler and
    ``position_ids``, the DN ``label_enc``), all under DDP's ``module.`` prefix.
    """
    ours = hf_to_ours_state_dict(hf_sd)
    idea = {k.replace("backbone.0.body.", "backbone.0."): v for k, v in ours.items() if not k.startswith(MASK_HEAD)}
    for k, v in model.state_dict().items():
        if k.endswith("relative_position_index"):
            idea[k.replace("backbone.0.body.", "backbone.0.")] = v.clone()
    h = hf_sd["model.text_backbone.embeddings.word_embeddings.weight"].shape[1]
    torch.manual_seed(4)
    idea["bert.pooler.dense.weight"] = torch.randn(h, h)
    idea["bert.pooler.dense.bias"] = torch.randn(h)
    idea["bert.embeddings.position_ids"] = torch.arange(512)[None]
    idea["label_enc.weight"] = torch.randn(2001, 64)
    return {"module." + k: v for k, v in idea.items()}


def test_idea_pth_through_the_train_path(hf_dirs, mgd_synthetic, tmp_path, caplog):
    cfg = _hf_spec(mgd_synthetic, hf_dirs["root"] / "bert")
    idea = _idea_state_dict(hf_dirs["sd"], _ours(hf_dirs["cfg"]))
    expected = gdino_key_shapes(_model_sizes(cfg.model), hf_dirs["cfg"].text_config, "idea")
    assert {k[len("module."):]: list(v.shape) for k, v in idea.items()} == expected
    path = tmp_path / "groundingdino_swint_ogc.pth"
    torch.save({"model": idea, "optimizer": {}, "epoch": 11}, path)
    assert detect_format(read_source(path), formats()).name == "idea"
    assert_inspect_names(path, "mask_grounding_dino", "idea")

    cfg.train.pretrained_model_path = str(path)
    with caplog.at_level(logging.INFO):
        module = MaskGDinoModule(cfg, RunContext("train", tmp_path))
    assert "newly initialised" in caplog.text and "(idea:" in caplog.text
    worst = _max_diff_to_hf(_run(module.model, hf_dirs["inputs"]), hf_dirs["ref"])
    print(f"IDEA .pth via train.pretrained_model_path: max |diff| = {worst:.2e}")
    assert worst <= 1e-4


# ------------------------------------------------------------------------------------------- ours / wrong
def test_tao_cli_checkpoint_tagged_or_bare_is_ours(hf_dirs, tmp_path):
    torch.manual_seed(6)
    src = _ours(hf_dirs["cfg"])
    sd = src.state_dict()
    tagged = tmp_path / "mask_gdino_model_latest.pth"
    torch.save({"state_dict": {"model." + k: v for k, v in sd.items()}, "tao_model": "mask_grounding_dino",
                "epoch": 1}, tagged)
    from safetensors.torch import save_file

    bare = tmp_path / "converted.safetensors"  # bare model keys, tied box heads stored as copies
    save_file({k: v.clone().contiguous() for k, v in sd.items()}, str(bare))
    for path in (tagged, bare):
        torch.manual_seed(7)
        dst = _ours(hf_dirs["cfg"])
        report = load_full_weights(dst, path)
        assert report.missing == [] and not report.unexpected
        assert all(torch.equal(v, sd[k]) for k, v in dst.state_dict().items())


def test_wrong_files_are_refused_in_one_line(tmp_path, hf_dirs):
    from safetensors.torch import save_file

    m2f = tmp_path / "mask2former-swin-tiny-coco-instance"
    m2f.mkdir()
    (m2f / "config.json").write_text(json.dumps({"model_type": "mask2former",
                                                 "architectures": ["Mask2FormerForUniversalSegmentation"]}))
    save_file({"model.pixel_level_module.encoder.embeddings.patch_embeddings.projection.weight": torch.zeros(4, 3, 4, 4),
               "model.transformer_module.decoder.layers.0.self_attn.k_proj.weight": torch.zeros(4, 4),
               "class_predictor.weight": torch.zeros(3, 4)}, str(m2f / "model.safetensors"))
    mal_tagged = tmp_path / "mal_model_latest.pth"
    torch.save({"state_dict": {"model.student.backbone.patch_embed.proj.weight": torch.zeros(4, 3, 16, 16)},
                "tao_model": "mal"}, mal_tagged)
    mal_tao = tmp_path / "mal_tao.pth"
    torch.save({"state_dict": {"model.model_teacher.backbone.blocks.0.attn.qkv.weight": torch.zeros(12, 4),
                               "model.model_student.backbone.blocks.0.attn.qkv.weight": torch.zeros(12, 4)}}, mal_tao)
    model = _ours(hf_dirs["cfg"])
    for path, words in ((m2f, "weights in any known layout"), (mal_tagged, "'mal' checkpoint"),
                        (mal_tao, "weights in any known layout")):
        with pytest.raises(CheckpointError) as err:
            load_full_weights(model, path)
        text = err.value.one_line()
        assert words in text and "\n" not in text, text


def test_forced_format_is_checked(hf_dirs):
    model = _ours(hf_dirs["cfg"])
    with pytest.raises(CheckpointError, match="unknown weights format 'detectron2'"):
        load_full_weights(model, hf_dirs["root"] / "safetensors", weights_format="detectron2")
    with pytest.raises(CheckpointError) as err:  # the HF directory read as a TAO checkpoint does not fit
        load_full_weights(model, hf_dirs["root"] / "safetensors", weights_format="tao")
    assert "(tao) does not fit" in err.value.one_line()


# ------------------------------------------------------------------------------------------- backbone
def test_backbone_from_a_microsoft_release_and_from_a_full_idea_checkpoint(hf_dirs, tmp_path, caplog):
    from networks.mask_grounding_dino.model import load_backbone_weights

    torch.manual_seed(8)
    src = _ours(hf_dirs["cfg"])
    swin = src.swin.state_dict()
    release = {k: v for k, v in swin.items() if not k.startswith("norm")}  # a classifier: final norm + head
    release |= {"norm.weight": torch.ones(256), "norm.bias": torch.zeros(256), "head.weight": torch.zeros(10, 256),
                "head.bias": torch.zeros(10)}
    torch.save({"model": release}, tmp_path / "swin_tiny_patch4_window2.pth")
    idea = _idea_state_dict(hf_dirs["sd"], src)
    torch.save({"model": idea}, tmp_path / "groundingdino.pth")
    for name, fmt, new in (("swin_tiny_patch4_window2.pth", "swin-microsoft", 6), ("groundingdino.pth",
                                                                                    "idea-backbone", 0)):
        torch.manual_seed(9)
        dst = _ours(hf_dirs["cfg"])
        before = {k: v.clone() for k, v in dst.state_dict().items() if not k.startswith("backbone.")}
        with caplog.at_level(logging.INFO):
            report = load_backbone_weights(dst, tmp_path / name)
        assert f"({fmt}:" in caplog.text
        assert len(report.missing) == new and all(k.startswith("backbone.0.body.norm") for k in report.missing)
        expected = swin if fmt == "swin-microsoft" else {
            k[len("backbone.0."):]: v for k, v in ((k[len("module."):], v) for k, v in idea.items())
            if k.startswith("backbone.0.")}
        for k, v in dst.swin.state_dict().items():
            if not (fmt == "swin-microsoft" and k.startswith("norm")):
                assert torch.equal(v, expected[k]), k
        assert all(torch.equal(v, before[k]) for k, v in dst.state_dict().items() if k in before)


def test_backbone_with_another_window_is_resized_and_logged(hf_dirs, tmp_path, caplog):
    from networks.mask_grounding_dino.model import load_backbone_weights

    src = SwinTransformer(embed_dim=32, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8], window_size=7,
                          out_indices=(1, 2, 3))
    torch.save({"model": src.state_dict()}, tmp_path / "swin_w7.pth")
    dst = _ours(hf_dirs["cfg"])  # window 2
    with caplog.at_level(logging.INFO):
        report = load_backbone_weights(dst, tmp_path / "swin_w7.pth")
    assert "from window 7 to 2" in caplog.text and report.missing == []
    assert dst.swin.layers[0].blocks[0].attn.relative_position_bias_table.shape == (9, 1)
    assert torch.equal(dst.swin.patch_embed.proj.weight, src.patch_embed.proj.weight)


def test_backbone_of_another_network_is_refused_in_one_line(hf_dirs, tmp_path):
    from networks.mask_grounding_dino.model import load_backbone_weights

    torch.save({"model": {"blocks.0.attn.qkv.weight": torch.zeros(12, 4), "cls_token": torch.zeros(1, 1, 4)}},
               tmp_path / "vit.pth")
    with pytest.raises(CheckpointError) as err:
        load_backbone_weights(_ours(hf_dirs["cfg"]), tmp_path / "vit.pth")
    assert "weights in any known layout" in err.value.one_line() and "\n" not in err.value.one_line()


# ------------------------------------------------------------------------------------------ BERT dirs
@pytest.mark.parametrize("head", ["BertModel", "BertForMaskedLM", "BertForPreTraining"])
@pytest.mark.parametrize("container", ["safetensors", "bin"])
def test_any_local_bert_directory_is_a_text_encoder(head, container, tmp_path):
    import transformers as tf

    config = tf.BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=32)
    torch.manual_seed(0)
    full = getattr(tf, head)(config)
    base = full if head == "BertModel" else full.bert
    full.save_pretrained(tmp_path)
    if container == "bin":  # an older release: only pytorch_model.bin (`bert.`-prefixed with `cls.*` heads)
        (tmp_path / "model.safetensors").unlink()
        torch.save(full.state_dict(), tmp_path / "pytorch_model.bin")
    assert any(k.startswith("cls.") for k in full.state_dict()) == (head != "BertModel")
    encoder = BertTextEncoder.from_pretrained(tmp_path)
    own = encoder.state_dict()
    assert own and all(torch.equal(v, base.state_dict()[k]) for k, v in own.items())
    ids = torch.tensor([[1, 5, 7, 2, 0]])
    block = torch.ones(1, 5, 5, dtype=torch.bool)
    pos = torch.arange(5)[None]
    base.eval()
    encoder.eval()
    with torch.no_grad():
        ref = base(input_ids=ids, attention_mask=block[:, None], position_ids=pos).last_hidden_state
        torch.testing.assert_close(encoder(ids, block, pos), ref, atol=0, rtol=0)


def test_bert_directory_with_foreign_weight_names_is_refused(tmp_path):
    import transformers as tf
    from safetensors.torch import save_file

    config = tf.BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=32)
    model = tf.BertModel(config)
    model.save_pretrained(tmp_path)
    save_file({"text_model." + k: v.contiguous() for k, v in model.state_dict().items()},
              str(tmp_path / "model.safetensors"))
    with pytest.raises(ConfigError) as err:
        BertTextEncoder.from_pretrained(tmp_path)
    assert err.value.subject == "model.text_encoder_type" and "lack" in err.value.one_line()


if __name__ == "__main__":  # regenerate the TAO key fixture
    DATA.mkdir(exist_ok=True)
    TAO_FIXTURE.write_text(json.dumps(tao_fixture(), indent=1) + "\n")
    print(f"wrote {TAO_FIXTURE}")
