"""metrics.jsonl after a resume: the records of the steps the resumed run redoes (and a line a kill
cut mid-write) move to metrics.jsonl.superseded, so that each step is there once and readable."""
import json

from flashdino.engine.metrics import SUPERSEDED_SUFFIX, MetricsLogger, read_jsonl, supersede_records_after


def _write(path, steps, tail=""):
    with open(path, "w") as fh:
        for step in steps:
            fh.write(json.dumps({"step": step, "total_loss": -float(step)}) + "\n")
        fh.write(tail)


def test_records_after_the_resumed_step_move_aside_and_logging_continues(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    _write(path, range(1, 11), tail='{"step": 11, "total_lo')  # killed mid-write
    logger = MetricsLogger(str(tmp_path), total_steps=20, start_step=6, tensorboard=False, progress_bar=False)
    logger.log(7, {"total_loss": -70.0})
    logger.close()
    assert [r["step"] for r in read_jsonl(path)] == [1, 2, 3, 4, 5, 6, 7]
    assert read_jsonl(path)[-1]["total_loss"] == -70.0
    superseded = open(str(path) + SUPERSEDED_SUFFIX).read().splitlines()
    assert [json.loads(line)["step"] for line in superseded[:4]] == [7, 8, 9, 10]
    assert superseded[4] == '{"step": 11, "total_lo'
    assert "5 line(s) of steps after 6" in capsys.readouterr().err


def test_a_run_started_over_moves_every_record_and_nothing_moves_twice(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write(path, range(1, 4))
    assert supersede_records_after(str(path), 0) == 3
    assert read_jsonl(path) == []
    assert supersede_records_after(str(path), 0) == 0
    assert len(open(str(path) + SUPERSEDED_SUFFIX).read().splitlines()) == 3
    assert supersede_records_after(str(tmp_path / "absent.jsonl"), 5) == 0
