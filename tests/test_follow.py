"""A local job's progress in the terminal (jobs/follow.py, used by ``--cluster local`` and so
``make demo``): the job's own progress lines as they are appended, periodic ones thinned out
per job tag, a tag's last step always shown, no library noise and no checkpoint lines. The
end-to-end case (a real local pipeline's stdout): tests/test_pipeline.py."""
import io

from jobs.follow import LogFollower


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def follower(tmp_path):
    out, clock = io.StringIO(), Clock()
    log = tmp_path / "job_0_log.out"
    return log, out, clock, LogFollower(log, every_s=10, out=out, clock=clock)


def step(n: int, tag: str = "pretrain") -> str:
    return f"[{tag}] epoch 0 step {n}/100 loss 0.5 lr 1e-4 600 img/s eta {(100 - n) / 50:.1f} min\n"


def test_progress_lines_are_shown_thinned_and_the_last_step_always(tmp_path):
    log, out, clock, f = follower(tmp_path)
    f.poll()                                        # the job has not opened its log yet
    assert out.getvalue() == ""
    log.write_text("submitit INFO (2026-12-06 06:36:26,457) - Starting with JobEnvironment(...)\n"
                   "[2026-12-06 06:36:29,553] [WARNING] [real_accelerator.py:213] Setting accelerator\n"
                   "[pretrain] start: mae, 100 steps (50/epoch, batch 64)\n" + step(10))
    f.poll()
    assert out.getvalue() == "  [pretrain] start: mae, 100 steps (50/epoch, batch 64)\n  " + step(10)
    with open(log, "a") as fh:                      # within 10 s: held, not shown
        fh.write(step(20) + "[pretrain] checkpoint step_00000020 (epoch 0, micro-batch 20)\n" + step(30))
    clock.t = 5
    f.poll()
    assert out.getvalue().count("step ") == 1
    clock.t = 12
    with open(log, "a") as fh:
        fh.write(step(40))
    f.poll()                                        # 10 s on: the newest one
    assert out.getvalue().endswith("  " + step(40)) and "step 30/" not in out.getvalue()
    with open(log, "a") as fh:                      # a line cut mid-write waits for its end
        fh.write(step(50) + "[pretrain] exported encoder to /r")
    clock.t = 13
    f.poll()
    assert "exported" not in out.getvalue()
    with open(log, "a") as fh:
        fh.write("un/encoder.pt\n")
    f.poll()
    # the held step 50 comes before the line that followed it in the log
    assert out.getvalue().endswith("  " + step(50) + "  [pretrain] exported encoder to /run/encoder.pt\n")
    assert "checkpoint" not in out.getvalue() and "WARNING" not in out.getvalue()


def test_the_end_of_a_job_shows_each_tags_last_step_and_an_unfinished_line(tmp_path):
    log, out, clock, f = follower(tmp_path)
    log.write_text(step(1, "finetune") + step(2, "finetune") + step(3, "eval")
                   + "[eval] knn: top1=71.2")      # no newline: the job died mid-line
    f.poll()
    assert out.getvalue() == "  " + step(1, "finetune") + "  " + step(3, "eval")
    f.poll(final=True)
    assert out.getvalue().endswith("  [eval] knn: top1=71.2\n  " + step(2, "finetune"))


def test_terminal_progress_names_the_job_and_follows_local_jobs_only(tmp_path, capsys):
    """What ``Launcher.run_plan`` gets from jobs/submit.py and, with the cell's id as prefix,
    from a local sweep: the job's name and log as it starts, then its progress lines."""
    from types import SimpleNamespace

    from jobs.follow import terminal_progress

    log = tmp_path / "0_log.out"
    log.write_text("[pretrain] start: mae, 4 steps\n" + step(4))
    spec, job = SimpleNamespace(name="pretrain"), object()
    for cluster, shown in (("local", True), ("debug", False)):     # debug: the job prints itself
        launcher = SimpleNamespace(cluster=cluster, log_path=lambda job: str(log))
        started, polled = terminal_progress(launcher, "mae-seed0/")
        started(spec, job)
        polled(True)
        out = capsys.readouterr().out
        assert out.startswith(f"running mae-seed0/pretrain (log {log})\n")
        assert ("  [pretrain] start: mae, 4 steps\n  " + step(4) in out) is shown, out
