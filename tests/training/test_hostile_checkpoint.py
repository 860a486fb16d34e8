"""kill -9 in the middle of a checkpoint write: the run resumes exactly and no temporary directory stays
behind (weights.atomic_dir's temporaries of dead writers are removed when a run starts or resumes)."""
import os
import subprocess
import sys
from pathlib import Path

from llamaforge.training.pretrain import train
from llamaforge.weights import atomic_dir, remove_stale_temporaries

from pretrain_helpers import losses, make_data, tiny_train_config

HERE = Path(__file__).resolve().parent

# Run a tiny pretraining in a child process that SIGKILLs itself right after the step-8 checkpoint's
# weights are written into its temporary directory: a kill -9 at that moment, deterministically.
CHILD = """
import os, signal, sys
sys.path.insert(0, {here!r})
import safetensors.torch
from pretrain_helpers import tiny_train_config
from llamaforge.training.loop import RunLog
from llamaforge.training.pretrain import train
RunLog.plot = lambda self: None  # (loss.png: seconds of matplotlib that this test does not need)
real = safetensors.torch.save_file
def save_file(tensors, path, *a, **kw):
    real(tensors, path, *a, **kw)
    if ".step_00000008.tmp" in str(path):
        os.kill(os.getpid(), signal.SIGKILL)
safetensors.torch.save_file = save_file
train(tiny_train_config({data!r}, {run!r}))
"""


def hidden(run: Path) -> list[str]:
    return sorted(p.name for d in (run, run / "ckpt") if d.is_dir() for p in d.iterdir() if p.name.startswith("."))


def test_kill_9_during_a_checkpoint_write_resumes_exactly_and_leaves_no_temporaries(tmp_path):
    data = make_data(tmp_path / "data")[0]
    run = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(HERE.parents[1]) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-c", CHILD.format(here=str(HERE), data=str(data), run=str(run))],
                       capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == -9, p.stderr[-2000:]
    left = hidden(run)
    assert len(left) == 1 and left[0].startswith(".step_00000008.tmp"), left  # the half-written checkpoint
    assert not (run / "ckpt" / "step_00000008").exists() and (run / "ckpt" / "step_00000004").exists()
    before = losses(run)  # steps 1-8 were logged before the kill
    assert sorted(before) == list(range(1, 9))
    train(tiny_train_config(data, run, resume=True))  # from step 4: steps 5-8 again
    assert hidden(run) == []
    assert losses(run) == before  # bit for bit


def test_stale_temporaries_of_dead_writers_go_and_live_ones_stay(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = os.getpid()
    for name in (f".model.tmp{dead.pid}.ab12", f".model.tmp{live}.cd34", f".other.tmp{dead.pid}.ef56",
                 f".ckpt.old{dead.pid}", f".lost.old{dead.pid}"):
        (tmp_path / name).mkdir()
    (tmp_path / "ckpt").mkdir()
    (tmp_path / f".lost.old{dead.pid}" / "weights").write_text("the previous version")
    removed = remove_stale_temporaries(tmp_path, "model|ckpt|lost")
    assert sorted(p.name for p in removed) == sorted([f".model.tmp{dead.pid}.ab12", f".ckpt.old{dead.pid}", f".lost.old{dead.pid}"])
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([f".model.tmp{live}.cd34", f".other.tmp{dead.pid}.ef56", "ckpt", "lost"])  # others' names untouched
    assert (tmp_path / "lost" / "weights").read_text() == "the previous version"  # killed mid-swap: restored
    with atomic_dir(tmp_path / "other") as tmp:  # writing a destination clears its own stale temporaries
        (tmp / "f").write_text("x")
    assert not (tmp_path / f".other.tmp{dead.pid}.ef56").exists() and (tmp_path / "other" / "f").exists()
