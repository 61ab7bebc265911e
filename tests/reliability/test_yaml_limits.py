"""A spec whose anchors and aliases expand to an enormous document is refused in one line, before anything
expands it (alias "billion laughs" bombs hung the loader and grew to gigabytes)."""
from __future__ import annotations

import pytest

from networks.common.errors import ConfigError
from tao_cli.spec import MAX_YAML_NODES, load_spec
from tests.tao_cli.test_spec import ToyExperiment

pytestmark = pytest.mark.reliability


def _mapping_bomb(levels: int = 9, fan: int = 9) -> str:
    lines = ["a0: &a0 {x: 1, y: 2}"]
    for i in range(1, levels + 1):
        refs = ", ".join(f"k{j}: *a{i - 1}" for j in range(fan))
        lines.append(f"a{i}: &a{i} {{{refs}}}")
    return "\n".join(lines) + "\n"


def _list_bomb(levels: int = 9, fan: int = 9) -> str:
    lines = ["_l0: &l0 [0.5, 0.5]"]
    for i in range(1, levels + 1):
        lines.append(f"_l{i}: &l{i} [{', '.join(f'*l{i - 1}' for _ in range(fan))}]")
    lines.append(f"train:\n  mask_thres: *l{levels}")
    return "\n".join(lines) + "\n"


@pytest.mark.timeout(60)  # before the fix these never returned; a regression fails instead of hanging the suite
@pytest.mark.parametrize("text", [_mapping_bomb(), _list_bomb()], ids=["mapping", "list"])
def test_alias_bomb_is_refused_in_one_line(tmp_path, text):
    spec = tmp_path / "bomb.yaml"
    spec.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_spec(ToyExperiment, "train", spec, [])
    line = err.value.one_line()
    assert err.value.subject == str(spec) and f"more than {MAX_YAML_NODES} nodes" in line and "\n" not in line


def test_ordinary_anchors_still_work(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("train:\n  num_epochs: &n 3\n  checkpoint_interval: *n\n")
    cfg = load_spec(ToyExperiment, "train", spec, [])
    assert cfg.train.num_epochs == 3 and cfg.train.checkpoint_interval == 3
