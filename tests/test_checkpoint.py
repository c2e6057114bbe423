import json

import pytest
import torch

from ldm.training.checkpoint import (
    EMA,
    checkpoints,
    latest_checkpoint,
    resolve_resume,
    save_checkpoint,
)


def test_ema_closed_form_and_exact_state_round_trip():
    p = torch.nn.Parameter(torch.zeros(3))
    ema = EMA([p], decay=0.9)
    with torch.no_grad():
        p.fill_(1.0)
    for _ in range(10):
        ema.update([p])
    # The first update copies (decay 0), so e_n = 1 for a constant target 1 from e_0 = 0.
    torch.testing.assert_close(ema.shadow[0], torch.ones(3))
    with torch.no_grad():
        p.fill_(3.0)
    ema.update([p])  # the 11th update: decay min(0.9, 11 / 20) = 0.55
    torch.testing.assert_close(ema.shadow[0], torch.full((3,), 0.55 * 1 + 0.45 * 3))
    restored = EMA([torch.nn.Parameter(torch.zeros(3))], decay=0.5, power=0.75, inv_gamma=2.0)
    restored.load_state_dict(ema.state_dict())
    assert (restored.decay, restored.power, restored.inv_gamma) == (0.9, None, 1.0)
    assert restored.num_updates == 11 and torch.equal(restored.shadow[0], ema.shadow[0])
    target = torch.nn.Parameter(torch.zeros(3))
    ema.copy_to([target])
    torch.testing.assert_close(target.data, ema.shadow[0])
    with pytest.raises(ValueError, match=r"ema_decay must be in \[0, 1\), got 1.0"):
        EMA([p], decay=1.0)
    with pytest.raises(ValueError, match=r"ema_power must be null or > 0, got -1"):
        EMA([p], decay=0.9, power=-1)


@pytest.mark.parametrize(
    ("decay", "power", "inv_gamma"), [(0.9999, None, 1.0), (0.999, 2 / 3, 1.0), (0.9999, 0.75, 5.0)]
)
def test_ema_decay_sequence_equals_diffusers_ema_model(decay, power, inv_gamma):
    from diffusers.training_utils import EMAModel

    param = torch.nn.Parameter(torch.zeros(2))
    ours = EMA([param], decay, power=power, inv_gamma=inv_gamma)
    theirs = EMAModel(
        [param],
        decay=decay,
        use_ema_warmup=power is not None,
        power=power if power is not None else 2 / 3,
        inv_gamma=inv_gamma,
    )
    steps = [*range(1, 200), 1000, 10_000, 100_000, 1_000_000]
    expected = [theirs.get_decay(n) for n in steps]  # diffusers' n-th step() uses get_decay(n)
    assert [ours.decay_at(n) for n in steps] == pytest.approx(expected, rel=0, abs=1e-15)
    assert max(expected) <= decay and expected[0] == 0.0  # capped at decay; the first update copies
    # The averages agree too, update by update, on a moving target.
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        with torch.no_grad():
            param.add_(torch.randn(2, generator=generator))
        ours.update([param])
        theirs.step([param])
        torch.testing.assert_close(ours.shadow[0], theirs.shadow_params[0], rtol=0, atol=1e-6)


def test_ema_of_a_checkpoint_from_before_the_warm_up_keeps_its_fixed_decay():
    state = {"decay": 0.99, "shadow.0": torch.ones(3)}  # what EMA.state_dict wrote until now
    ema = EMA([torch.nn.Parameter(torch.zeros(3))], decay=0.5)
    ema.load_state_dict(state)
    assert ema.decay_at(ema.num_updates + 1) == 0.99


def test_ema_saves_to_safetensors_by_parameter_name_and_loads_back_exactly(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]
    ema = EMA(params, decay=0.9, power=0.75, inv_gamma=2.0)
    for _ in range(7):
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn(p.shape))
        ema.update(params)
    names = ["conv.weight", "conv.bias"]
    ema.save(tmp_path / "ema.safetensors", names)
    tensors = load_file(tmp_path / "ema.safetensors")  # plain safetensors, no pickle
    assert sorted(tensors) == sorted(names)
    assert torch.equal(tensors["conv.weight"], ema.shadow[0])
    with safe_open(str(tmp_path / "ema.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["ldm.ema"]) == {
            "decay": 0.9,
            "power": 0.75,
            "inv_gamma": 2.0,
            "num_updates": 7,
        }
    restored = EMA([torch.nn.Parameter(torch.zeros(3, 2)), torch.nn.Parameter(torch.zeros(4))], 0.5)
    restored.load(tmp_path / "ema.safetensors", names)
    assert (restored.decay, restored.power, restored.inv_gamma) == (0.9, 0.75, 2.0)
    assert restored.num_updates == 7
    assert all(torch.equal(a, b) for a, b in zip(restored.shadow, ema.shadow, strict=True))
    with pytest.raises(ValueError, match=r"lacks \['conv.kernel'\] and holds \['conv.weight'\]"):
        restored.load(tmp_path / "ema.safetensors", ["conv.kernel", "conv.bias"])
    with pytest.raises(ValueError, match="distinct names"):
        ema.save(tmp_path / "twice.safetensors", ["a", "a"])


def write_files(n_files=3):
    def write(folder):
        for i in range(n_files):
            (folder / f"part{i}.bin").write_bytes(b"x" * 10)

    return write


def test_checkpoints_rotate_after_the_new_one_is_complete(tmp_path):
    for step in (10, 20, 30, 40):
        save_checkpoint(tmp_path, step, write_files(), keep=2)
    assert [p.name for p in checkpoints(tmp_path)] == ["checkpoint-30", "checkpoint-40"]
    assert latest_checkpoint(tmp_path).name == "checkpoint-40"
    assert sorted(p.name for p in (tmp_path / "checkpoint-40").iterdir()) == [
        "part0.bin",
        "part1.bin",
        "part2.bin",
    ]


def test_a_crash_mid_write_leaves_the_latest_checkpoint_intact(tmp_path):
    save_checkpoint(tmp_path, 10, write_files(), keep=1)

    def crash(folder):
        (folder / "half.bin").write_bytes(b"partial")
        raise KeyboardInterrupt  # killed while writing

    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 20, crash, keep=1)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-10"]  # no temp folder, old one kept
    assert latest_checkpoint(tmp_path).name == "checkpoint-10"
    # a temp folder left by a hard kill (SIGKILL) is not a checkpoint, and is cleared on the next save
    (tmp_path / ".tmp-checkpoint-30").mkdir()
    assert latest_checkpoint(tmp_path).name == "checkpoint-10"
    save_checkpoint(tmp_path, 30, write_files(1), keep=1)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-30"]


def test_resolve_resume(tmp_path):
    assert resolve_resume(tmp_path, None) is None
    with pytest.raises(FileNotFoundError, match=r"--resume latest: .* holds no checkpoint-N"):
        resolve_resume(tmp_path, "latest")  # nothing saved yet: an error, not a quiet start
    assert resolve_resume(tmp_path, "auto") is None  # auto: a fresh start
    save_checkpoint(tmp_path, 5, write_files(1), keep=3)
    (tmp_path / "checkpoint-5" / "training_state_0.pt").write_bytes(b"")
    assert resolve_resume(tmp_path, "latest") == tmp_path / "checkpoint-5"
    assert resolve_resume(tmp_path, "auto") == tmp_path / "checkpoint-5"
    assert resolve_resume(tmp_path, tmp_path / "checkpoint-5") == tmp_path / "checkpoint-5"
    with pytest.raises(FileNotFoundError, match=r"--resume .*checkpoint-99 does not exist"):
        resolve_resume(tmp_path, str(tmp_path / "checkpoint-99"))
    with pytest.raises(FileNotFoundError, match="is not a checkpoint folder"):
        resolve_resume(tmp_path, tmp_path)
