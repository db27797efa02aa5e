"""train/runlock.py: one run per out_dir (the bad-input table's row through ``python -m train`` is
in test_bad_inputs.py)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO
from train.runlock import RunFolderBusy, RunLock


@contextlib.contextmanager
def lock_held_elsewhere(out):
    """Another process holds ``out``'s run lock inside the block (killed at its end); yields it."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from train.runlock import RunLock; RunLock(sys.argv[1]); "
         "print('locked', flush=True); time.sleep(600)", str(out)],
        cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield holder
    finally:
        holder.kill()
        holder.wait()


def test_a_held_folder_is_refused_naming_the_holder_and_freed_when_it_dies(tmp_path):
    out = tmp_path / "run"
    with lock_held_elsewhere(out) as holder:
        with pytest.raises(RunFolderBusy, match=f"in use by another run \\(pid {holder.pid} on "):
            RunLock(out)
    RunLock(out).release()  # the kernel dropped the dead holder's lock: no stale lock to clean up


def test_release_lets_the_next_run_in_and_a_file_is_not_a_folder(tmp_path):
    lock = RunLock(tmp_path / "run")
    lock.release()
    RunLock(tmp_path / "run").release()
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunFolderBusy, match="is an existing file, not a folder"):
        RunLock(tmp_path / "file")


def test_a_filesystem_without_locks_warns_instead_of_refusing(tmp_path, capsys, monkeypatch):
    import errno

    import train.runlock as runlock

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(runlock.fcntl, "lockf", no_locks)
    runlock.RunLock(tmp_path / "run").release()
    assert capsys.readouterr().err.startswith(f"warning: train.out_dir {tmp_path / 'run'}: cannot lock the run folder (No locks available)")
