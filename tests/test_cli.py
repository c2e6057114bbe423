import shutil
import subprocess
import sys

import pytest

from ldm import __version__
from ldm.cli import main
from ldm.diffusion.schedule import NoiseSchedule, make_timesteps


def test_console_script_help_and_version():
    exe = shutil.which("ldm")
    assert exe is not None, "the `ldm` console script is not installed: pip install -e ."
    help_text = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True).stdout
    assert "usage: ldm" in help_text and "schedule" in help_text
    version = subprocess.run([exe, "--version"], capture_output=True, text=True, check=True).stdout
    assert version.strip() == f"ldm {__version__}"


def test_python_dash_m_runs_the_cli():
    out = subprocess.run(
        [sys.executable, "-m", "ldm.cli", "--version"], capture_output=True, text=True
    )
    assert out.returncode == 0 and out.stdout.strip() == f"ldm {__version__}"


def test_schedule_prints_the_sampler_timesteps(capsys):
    assert main(["schedule", "--steps", "4", "--spacing", "trailing"]) == 0
    rows = [
        line.split()
        for line in capsys.readouterr().out.splitlines()
        if not line.startswith(("#", " step"))
    ]
    timesteps = [int(row[1]) for row in rows]
    assert (
        timesteps
        == make_timesteps(4, 1000, timestep_spacing="trailing").tolist()
        == [999, 749, 499, 249]
    )
    alpha_bar = NoiseSchedule().alphas_cumprod64
    assert [float(row[2]) for row in rows] == pytest.approx(
        [alpha_bar[t].item() for t in timesteps], rel=1e-5
    )


def test_bad_argument_exits_nonzero_with_a_message_and_no_traceback(capsys):
    assert main(["schedule", "--steps", "0"]) == 2
    err = capsys.readouterr().err
    assert "--steps 0 is not allowed; use 1 to --num-train-timesteps (1000)" in err
    assert "Traceback" not in err
    with pytest.raises(SystemExit) as exit_info:
        main(["schedule", "--spacing", "karras"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'karras'" in capsys.readouterr().err
