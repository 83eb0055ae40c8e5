"""llmcourse.distributed (Day 35) and `llmcourse train` under torchrun, with gloo on this CPU.

These tests start real torchrun jobs of two processes (about five seconds each): two processes must
train what one process trains, only rank 0 may write, and a process that dies must end the job.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest
import torch

from llmcourse.distributed import distributed_session, init_distributed, multinode_command, run_torchrun, torchrun_environment

FULL = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


def weights(run_dir):
    return torch.load(run_dir / "last.pt", weights_only=True)


def largest_difference(a, b) -> float:
    return max((a["model"][k] - b["model"][k]).abs().max().item() for k in a["model"])


def train_args(out, corpus_file, *extra):
    return ["-m", "llmcourse", "train", "--out", str(out), "--corpus", str(corpus_file), "--n-layer", "1", "--n-head", "2",
            "--n-embd", "32", "--block-size", "16", "--batch-size", "8", "--max-steps", "30", "--warmup-steps", "10",
            "--eval-interval", "10", "--eval-iters", "2", "--log-interval", "5", "--dropout", "0", "--device", "cpu", *extra]


def one_process(args):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300)


# ---- the environment ----------------------------------------------------------------------------------


def test_torchrun_environment_reads_the_variables():
    assert torchrun_environment({}) is None
    assert torchrun_environment(FULL) == (1, 1, 2)
    assert torchrun_environment({**FULL, "RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}) == (5, 1, 8)


@pytest.mark.parametrize(
    "env, message",
    [
        ({"RANK": "0"}, "half set"),
        ({**FULL, "RANK": "x"}, "integers"),
        ({**FULL, "RANK": "2"}, "do not fit"),
        ({**FULL, "WORLD_SIZE": "0"}, "do not fit"),
        ({**FULL, "LOCAL_RANK": "3", "RANK": "1"}, "do not fit"),
    ],
)
def test_torchrun_environment_refuses_nonsense(env, message):
    with pytest.raises(ValueError, match=message):
        torchrun_environment(env)


def test_outside_torchrun_nothing_is_initialized(monkeypatch):
    for name in FULL:
        monkeypatch.delenv(name, raising=False)
    with distributed_session() as info:
        assert info is None and not torch.distributed.is_initialized()
    with pytest.raises(RuntimeError, match="torchrun"):
        init_distributed()


def test_multinode_command():
    line = multinode_command(["-m", "llmcourse", "train", "--out", "runs/a b"], nnodes=4, nproc_per_node=8, endpoint="node1:29400", job_id="j7")
    assert line == ("torchrun --nnodes=4 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=node1:29400 --rdzv_id=j7 "
                    "-m llmcourse train --out 'runs/a b'")
    for bad in [dict(nnodes=0), dict(nproc_per_node=True), dict(endpoint="node1"), dict(endpoint=":80"), dict(endpoint="h:port")]:
        with pytest.raises(ValueError):
            multinode_command([], **{**dict(nnodes=1, nproc_per_node=1, endpoint="h:1"), **bad})


def test_run_torchrun_checks_its_count_and_kills_a_job_that_runs_too_long(tmp_path):
    with pytest.raises(ValueError, match="nproc_per_node"):
        run_torchrun(["x.py"], nproc_per_node=0)
    script = tmp_path / "sleep.py"
    script.write_text("import time\ntime.sleep(120)\n")
    start = time.perf_counter()
    with pytest.raises(subprocess.TimeoutExpired):
        run_torchrun([str(script)], nproc_per_node=2, timeout_s=10)
    assert time.perf_counter() - start < 30


def test_the_demonstrations_refuse_to_run_alone():
    job = one_process(["-m", "llmcourse.distributed", "all_reduce"])
    assert job.returncode == 2 and "torchrun" in job.stderr
    job = one_process(["-m", "llmcourse.distributed", "nonsense"])
    assert job.returncode == 2 and "usage" in job.stderr


# ---- llmcourse train under torchrun ----------------------------------------------------------------------


def test_two_processes_train_what_one_process_trains(tmp_path, corpus_file):
    one = one_process(train_args(tmp_path / "one", corpus_file))
    two = run_torchrun(train_args(tmp_path / "two", corpus_file))
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert largest_difference(a, b) < 1e-5
    for x, y in zip(a["history"], b["history"]):
        assert (x["step"], x["eval"]) == (y["step"], y["eval"])
        assert x["train_loss"] == pytest.approx(y["train_loss"], abs=1e-5)  # rank 0 logs the mean over processes
    # rank 0 alone speaks and writes: as many lines and log records as one process
    assert two.stdout.count("done: 30 steps") == 1 and len(two.stdout.splitlines()) == len(one.stdout.splitlines())
    assert "2 processes (4 sequences each)" in two.stdout
    assert len((tmp_path / "two" / "log.jsonl").read_text().splitlines()) == len(a["history"])


def test_processes_and_accumulation_combine_and_resume(tmp_path, corpus_file):
    two = run_torchrun(train_args(tmp_path / "two", corpus_file, "--grad-accum-steps", "2", "--max-steps", "20"))
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 micro-batches per step; 2 processes (4 sequences each)" in two.stdout
    one = one_process(train_args(tmp_path / "one", corpus_file, "--grad-accum-steps", "4", "--max-steps", "20"))
    assert one.returncode == 0, one.stderr
    assert largest_difference(weights(tmp_path / "one"), weights(tmp_path / "two")) < 1e-5
    resumed = run_torchrun(["-m", "llmcourse", "train", "--resume", str(tmp_path / "two"), "--max-steps", "30"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming at step 20" in resumed.stdout and weights(tmp_path / "two")["step"] == 30


def test_a_batch_the_processes_cannot_share_is_refused(tmp_path, corpus_file):
    job = run_torchrun(train_args(tmp_path / "bad", corpus_file, "--batch-size", "6", "--grad-accum-steps", "2"))
    assert job.returncode != 0
    assert "llmcourse train: error: batch_size 6 must be divisible by the 2 processes times grad_accum_steps 2" in job.stderr
    assert not (tmp_path / "bad" / "last.pt").exists()


def test_a_stop_decided_by_rank_0_stops_every_process(tmp_path, corpus_file):
    script = tmp_path / "stop.py"
    script.write_text(textwrap.dedent(f"""
        from llmcourse.distributed import distributed_session
        from llmcourse.train import Callback, TrainConfig, Trainer

        class StopAt10(Callback):
            def on_log(self, trainer, record):
                if trainer.step == 10:
                    trainer.should_stop = True

        with distributed_session():
            config = TrainConfig(corpus={str(corpus_file)!r}, n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=4,
                                 max_steps=40, warmup_steps=0, eval_interval=40, eval_iters=1, log_interval=5, device="cpu")
            trainer = Trainer(config, callbacks=[StopAt10()], progress=False)
            trainer.run()
            print(f"rank {{trainer.rank}} stopped at {{trainer.step}} with {{len(trainer.callbacks)}} callbacks", flush=True)
    """))
    job = run_torchrun([str(script)], timeout_s=120)
    assert job.returncode == 0, job.stderr[-3000:]
    assert sorted(job.stdout.split("\n")[:2]) == ["rank 0 stopped at 10 with 1 callbacks", "rank 1 stopped at 10 with 0 callbacks"]


def test_a_process_that_dies_ends_the_job(tmp_path):
    start = time.perf_counter()
    job = run_torchrun(["-m", "llmcourse.distributed", "die"], timeout_s=120)
    assert job.returncode != 0 and time.perf_counter() - start < 60
    assert "rank 1 fails on purpose at step 5" in job.stderr


# ---- the demonstrations -----------------------------------------------------------------------------------


def test_no_sync_all_reduces_once_per_accumulated_step():
    import json

    job = run_torchrun(["-m", "llmcourse.distributed", "count_syncs"])
    assert job.returncode == 0, job.stderr[-3000:]
    rows = [json.loads(line) for line in job.stdout.splitlines()]
    assert sorted(r["rank"] for r in rows) == [0, 1]
    assert all(r["with_no_sync"] >= 1 and r["without"] == 4 * r["with_no_sync"] and r["same_gradient"] for r in rows)


def test_fsdp2_shards_the_parameters_and_trains_like_one_process():
    import json

    job = run_torchrun(["-m", "llmcourse.distributed", "fsdp2"])
    assert job.returncode == 0, job.stderr[-3000:]
    rows = [json.loads(line) for line in job.stdout.splitlines()]
    assert len(rows) == 2
    for r in rows:
        assert r["bytes_after"] * 2 == r["bytes_before"]
        assert r["losses"]["sharded"] == pytest.approx(r["losses"]["whole"], abs=1e-4)
        assert r["losses"]["whole"][-1] < r["losses"]["whole"][0]  # it learns
        assert r["max_weight_difference"] < 1e-4
