"""What the launcher keeps of torchrun's stderr: the ranks' own lines, and a name for a rank that died silently."""

from spdecode.distributed.launch import TRACE_PREFIX, rank_lines

REPORT = """\
[W1129 12:00:00.000] torchrun banner
error: rank 0: rank 1 (stage 1) failed, hung or disconnected while rank 0 waited for it: Connection reset
Traceback (most recent call last):
  File "torch/distributed/run.py", line 1028, in main
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
Failures:
[1]:
  rank      : 2 (local_rank: 2)
  exitcode  : -15 (pid: 12)
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  rank      : 1 (local_rank: 1)
  exitcode  : -9 (pid: 11)
  traceback : Signal 9 (SIGKILL) received by PID 11
============================================================
"""


def test_launcher_names_a_silently_killed_rank_and_drops_torchrun_noise():
    assert rank_lines(REPORT, 1) == [
        "error: rank 0: rank 1 (stage 1) failed, hung or disconnected while rank 0 waited for it: Connection reset",
        "error: rank 1: killed by SIGKILL",  # the root cause; rank 2 was only stopped by torchrun (SIGTERM)
    ]


def test_launcher_passes_an_unexpected_exceptions_traceback_through():
    trace = [TRACE_PREFIX.format(rank=3) + x for x in ("Traceback (most recent call last):", "TypeError: bad")]
    err = "\n".join(["error: rank 3: unexpected TypeError: bad", *trace, "noise", "  rank      : 3 (local_rank: 3)",
                     "  exitcode  : 2 (pid: 9)"])
    assert rank_lines(err, 1) == ["error: rank 3: unexpected TypeError: bad", *trace]
    assert rank_lines("warning: rank 0: clamped\nnoise", 0) == ["warning: rank 0: clamped"]
