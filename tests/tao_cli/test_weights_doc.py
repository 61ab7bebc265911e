"""docs/weights.md: every ``$ tao weights ...`` line of its ``console`` blocks runs and succeeds on tiny stand-ins
of the files it names (MAE, DeiT, TAO MAL, tao-cli MAL checkpoints; tagged Mask2Former / Mask Grounding DINO
checkpoints), and says what the page says it does."""
from __future__ import annotations

import json
import re
import shlex
from functools import partial
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tao_cli.cli import app

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "weights.md"
KEYS = REPO / "tests/networks/mal/data/tao_mal_tiny_keys.json"

pytestmark = pytest.mark.usefixtures("one_thread")


def doc_commands() -> list[str]:
    """The ``$ tao weights`` lines of the ``console`` blocks, in order."""
    blocks = re.findall(r"```console\n(.*?)```", DOC.read_text(), flags=re.S)
    return [line[2:].strip() for block in blocks for line in block.splitlines() if line.startswith("$ tao weights")]


def _stand_ins(root: Path) -> None:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=224, patch_size=16, embed_dim=192, depth=12, num_heads=3, qkv_bias=True,
                            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6)).state_dict()
    mae = {k: v for k, v in vit.items() if not k.startswith("head.")}
    torch.save({"model": {**mae, "mask_token": torch.zeros(1, 1, 192)}}, root / "mae_pretrain_vit_base.pth")
    torch.save({"model": vit}, root / "deit_small_patch16_224-cd65a155.pth")
    gen = torch.Generator().manual_seed(0)
    state = {k: torch.randn(*s, generator=gen) for k, s in json.loads(KEYS.read_text())["keys"]}
    torch.save({"state_dict": {k: v for k, v in state.items() if k.startswith("student.")}},
               root / "tao_mal_model.pth")
    torch.save({"state_dict": state, "tao_model": "mal", "epoch": 2, "global_step": 20}, root / "mal_model_latest.pth")
    for net in ("mask2former", "mask_grounding_dino"):
        torch.save({"state_dict": {"model.backbone.x": torch.zeros(2, 2)}, "tao_model": net, "epoch": 0},
                   root / f"{net}_model_latest.pth")


#: what each documented command must print (a line of its output), by the file it names
EXPECT = {
    "mae_pretrain_vit_base.pth": "format:      mae",
    "deit_small_patch16_224-cd65a155.pth": "format:      deit",
    "tao_mal_model.pth": "format:      tao",
    "mal_model_latest.pth": "tao_model:   mal",
    "mask2former_model_latest.pth": "network:     mask2former",
    "mask_grounding_dino_model_latest.pth": "network:     mask_grounding_dino",
    "tao_mal_model.safetensors": "format:      tao",
}


def test_doc_lists_the_runnable_commands():
    cmds = doc_commands()
    assert len(cmds) == 9
    assert {c.split()[2] for c in cmds} == {"inspect", "convert"}


def test_doc_commands_run_on_tiny_stand_ins(tmp_path, monkeypatch):
    _stand_ins(tmp_path)
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    for cmd in doc_commands():
        argv = shlex.split(cmd)[1:]
        result = runner.invoke(app, argv, prog_name="tao")
        assert result.exit_code == 0, (cmd, result.output)
        if argv[1] == "inspect":
            assert EXPECT[argv[2]] in result.output.splitlines(), (cmd, result.output)
        else:
            out = Path(argv[argv.index("--out") + 1])
            assert out.is_file() and f"written:   {out}" in result.output
    converted = torch.load(tmp_path / "mae_base_mal.pth", weights_only=True)
    assert converted["tao_model"] == "mal" and converted["converted_from"]["format"] == "mae"
    assert sum(k.startswith("student.backbone.") for k in converted["state_dict"]) == 150
