import pytest
import torch

from ldm.checkpoint import EMA, checkpoints, latest_checkpoint, resolve_resume, save_checkpoint


def test_ema_closed_form_and_exact_state_round_trip():
    p = torch.nn.Parameter(torch.zeros(3))
    ema = EMA([p], decay=0.9)
    with torch.no_grad():
        p.fill_(1.0)
    for _ in range(10):
        ema.update([p])
    # e_n = 1 - 0.9^n for a constant target 1 from e_0 = 0
    torch.testing.assert_close(ema.shadow[0], torch.full((3,), 1 - 0.9**10))
    restored = EMA([torch.nn.Parameter(torch.zeros(3))], decay=0.5)
    restored.load_state_dict(ema.state_dict())
    assert restored.decay == 0.9 and torch.equal(restored.shadow[0], ema.shadow[0])
    target = torch.nn.Parameter(torch.zeros(3))
    ema.copy_to([target])
    torch.testing.assert_close(target.data, ema.shadow[0])
    with pytest.raises(ValueError, match=r"ema_decay must be in \[0, 1\), got 1.0"):
        EMA([p], decay=1.0)


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
    assert resolve_resume(tmp_path, "latest") is None  # nothing saved yet: a fresh start
    save_checkpoint(tmp_path, 5, write_files(1), keep=3)
    assert resolve_resume(tmp_path, "latest") == tmp_path / "checkpoint-5"
    with pytest.raises(FileNotFoundError, match="no checkpoint folder at"):
        resolve_resume(tmp_path, str(tmp_path / "checkpoint-99"))
