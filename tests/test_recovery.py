"""Recovery on the tiny world, a real local Ray cluster and real DeepSpeed: each fault SIGKILLs an actor's worker
process at a chosen phase (bench/faults.py); the run finishes, ends on exactly the scores and tokens of an
uninterrupted run, and prints one restart line per death. One GRPO run kills six roles in turn, one PPO run the
load balancer (an order open) and the critic: every role with as few runs as the suite's time allows. Also checkpoints that cannot lie (no Ray)."""
import glob
import json
import re
import time
from collections import Counter
from pathlib import Path

import pytest

from configs.schema import load_config
from trainer.loop.checkpoint import CheckpointManager, damage, write_manifest

SMALL = ["trainer.prompts_per_iteration=8", "trainer.samples_per_prompt=2", "trainer.micro_batch_size=4",
         "generation.max_slots=16", "tracking.progress=false", "generation.cpus_per_instance=1",
         "trainer.cpus_per_actor=0.5", "generation.strategy=tree:3,2,6", "draft.full_budget=true",
         "data.eval.size=8", "trainer.eval_every=2"]
# the balancer on, an instance a destination only when idle: orders move running samples in every rollout
BALANCED = ["balancer.enabled=true", "balancer.threshold=1", "balancer.interval_s=0.05", "balancer.cooldown_s=0.2",
            "generation.assignment=chunk"]
EXACT = ("score/mean", "reward/mean", "response/length_mean", "eval/score", "eval/sampled_score")
CLOSE = ("kl/mean", "loss/policy", "loss/value", "policy/entropy", "draft/loss")


# ---- checkpoints that cannot lie (no Ray) ---------------------------------------------------------------------
def fake_checkpoint(root: Path, n: int, complete: bool = True) -> Path:
    path = root / "checkpoints" / f"iter_{n:05d}"
    (path / "policy").mkdir(parents=True)
    (path / "policy" / "state.pt").write_bytes(b"x" * (100 + n))
    (path / "driver.json").write_text(json.dumps({"completed_iterations": n}))
    if complete:
        write_manifest(path)
    return path


def test_resume_takes_the_newest_complete_checkpoint_and_names_the_damaged(tmp_path):
    lines = []
    manager = CheckpointManager(str(tmp_path), 1, None, None, log=lambda line, **_: lines.append(line))
    assert manager.latest() is None
    fake_checkpoint(tmp_path, 1)
    second = fake_checkpoint(tmp_path, 2)
    third = fake_checkpoint(tmp_path, 3)
    fake_checkpoint(tmp_path, 4, complete=False)  # its save died before the manifest
    (third / "policy" / "state.pt").write_bytes(b"short")  # truncated after the manifest
    (tmp_path / "checkpoints" / ".iter_00005.partial").mkdir()  # never renamed into place: not a checkpoint
    assert damage(second) is None
    assert manager.latest(report=True) == second
    root = tmp_path / "checkpoints"
    assert lines == [f"checkpoint {root}/iter_00004 skipped: damaged, no manifest.json (its save never finished)",
                     f"checkpoint {root}/iter_00003 skipped: damaged, policy/state.pt is 5 bytes, the manifest "
                     "says 103"]
    (second / "driver.json").unlink()
    assert damage(second) == "driver.json is missing"


def test_keep_checkpoints_keeps_the_newest_complete(tmp_path):
    manager = CheckpointManager(str(tmp_path), 1, None, None, keep=2)
    for n in range(1, 5):
        fake_checkpoint(tmp_path, n, complete=n != 4)
    manager.prune()  # 4 is damaged: 3 and 2 are the newest complete; 1 goes, 4 stays (newer, named at resume)
    assert [p.name for p in manager.saved()] == ["iter_00004", "iter_00003", "iter_00002"]


def test_restarts_default_to_three():
    """(Bad recovery settings are among tests/test_config.py's named errors.)"""
    assert load_config(None, []).trainer.max_restarts == 3


# ---- SIGKILL at a chosen phase, on the session's Ray cluster --------------------------------------------------
def run_recorded(tmp_path, overrides, faults=()):
    """run() with the faults injected; returns (history, tokens per iteration, tokens per instance per
    iteration, injector)."""
    from bench import faults as fi
    from trainer.loop.driver import Driver
    from trainer.loop.run import run

    inj = fi.install(list(faults))
    tokens, per_instance = {}, {}
    original = Driver.generate

    def generate(self, prompts, iteration):
        rollouts, metrics = original(self, prompts, iteration)
        tokens[iteration] = [list(r.token_ids) for r in rollouts]  # a redone iteration overwrites its first try
        per_instance[iteration] = Counter()
        for r in rollouts:
            per_instance[iteration][r.stats["instance"]] += len(r.token_ids)
        return rollouts, metrics

    Driver.generate = generate
    try:
        cfg = load_config(None, SMALL + [f"trainer.output_dir={tmp_path}", *overrides])
        history = run(cfg)
    finally:
        Driver.generate = original
        inj.restore()
    return history, tokens, per_instance, inj


def assert_same_run(history, tokens, straight, straight_tokens):
    assert tokens == straight_tokens  # every sample of every iteration, token for token
    assert [row["iteration"] for row in history] == [row["iteration"] for row in straight]  # each once
    for row, want in zip(history, straight):
        for key in EXACT:
            assert row.get(key) == want.get(key), (row["iteration"], key)
        for key in CLOSE:
            if key in want:
                assert row[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), (row["iteration"], key)


def restart_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("restart ")]


def test_grpo_run_survives_six_roles_killed_in_turn(ray_cluster, tiny_world, tmp_path, capsys):
    """Deaths before the first checkpoint rewind to the run's start; later ones to iter_00002. A replaced instance
    takes work again; W&B holds each iteration once."""
    from bench.faults import Fault
    from trainer.loop.tracking import read_wandb_history

    common = ["trainer.algorithm=grpo", "trainer.iterations=5", "trainer.save_every=2", "generation.num_instances=2",
              "trainer.max_restarts=8"]
    straight, straight_tokens, _, _ = run_recorded(tmp_path / "straight", common + ["tracking.wandb=false"])
    capsys.readouterr()
    faults = [Fault("generation instance", "evaluation", 0), Fault("reference", "experience", 1),
              Fault("policy", "update", 1), Fault("generation instance", "rollout", 2),
              Fault("reward", "experience", 2), Fault("draft trainer", "update", 2),
              Fault("policy", "weight push", 3)]
    history, tokens, per_instance, inj = run_recorded(tmp_path / "killed", common, faults)
    out = capsys.readouterr().out
    assert all(f.killed_at is not None for f in faults), [(f.role, f.phase) for f in faults if not f.killed_at]
    assert_same_run(history, tokens, straight, straight_tokens)
    lines = restart_lines(out)
    assert len(lines) == len(faults), lines
    ckpt = tmp_path / "killed" / "checkpoints"
    expected = [r"restart 1/8: generation instance 1 died \(.+\); its \d+ samples resubmitted",
                r"restart 2/8: reference died \(.+\); made again in place, its call retried",
                r"restart 3/8: policy rank 0 died \(.+\); the trainers restart from the run start; iterations 0-1 "
                r"to redo",
                r"restart 4/8: generation instance 1 died",
                r"restart 5/8: reward actor died \(.+\); made again in place",
                rf"restart 6/8: draft trainer died \(.+\); the trainers restart from {ckpt}/iter_00002; iteration 2 "
                r"to redo",
                rf"restart 7/8: policy rank 0 died \(.+\); the trainers restart from {ckpt}/iter_00002; iterations "
                r"2-3 to redo"]
    for line, pattern in zip(lines, expected):
        assert re.match(pattern, line), (line, pattern)
    assert "SIGKILL" in out or "pid" in lines[2]  # Ray's reason
    assert "A worker died or was killed" not in out  # Ray's own notice of each death: the restart line says it
    # the replaced instance decodes again from the next iteration on
    assert per_instance[4][0] > 0 and per_instance[4][1] > 0
    (run_file,) = glob.glob(f"{tmp_path}/killed/wandb/offline-run-*/run-*.wandb")
    steps = []
    for _ in range(100):  # W&B's service may still be writing the offline file when finish() returns
        steps = [row["_step"] for row in read_wandb_history(run_file)]
        if len(steps) >= 6:
            break
        time.sleep(0.1)
    assert steps == [0, 1, 2, 3, 4, 5]
    assert (ckpt / "iter_00004" / "manifest.json").is_file()


def test_ppo_balancer_killed_moving_samples_then_critic_in_its_update(ray_cluster, tiny_world, tmp_path, capsys):
    """The balancer dies holding a running-sample order open (both stages done, neither side told): the fleet
    gives the verdict itself, the rollout finishes, a new balancer takes the next rollout. Then the critic dies
    in its update and the trainers rewind."""
    from bench.faults import Fault

    common = ["trainer.algorithm=ppo", "trainer.iterations=2", "trainer.save_every=1", "generation.num_instances=2",
              "tracking.wandb=false", "trainer.critic_warmup=0", "trainer.keep_checkpoints=1",
              *BALANCED]
    straight, straight_tokens, _, _ = run_recorded(tmp_path / "straight", common)
    capsys.readouterr()
    faults = [Fault("load balancer", "moving samples", 0), Fault("critic", "update", 1)]
    history, tokens, _, _ = run_recorded(tmp_path / "killed", common, faults)
    assert all(f.killed_at is not None for f in faults), [(f.role, f.phase) for f in faults if not f.killed_at]
    assert_same_run(history, tokens, straight, straight_tokens)
    ckpt = tmp_path / "killed" / "checkpoints"
    lines = restart_lines(capsys.readouterr().out)
    assert len(lines) == 2, lines
    assert re.match(r"restart 1/3: load balancer died \(.+\); its [1-9]\d* open orders? settled by the fleet "
                    r"\(\d+ samples moved, \d+ resumed at their source\); a new balancer from the next rollout on",
                    lines[0]), lines
    assert re.match(rf"restart 2/3: critic rank 0 died \(.+\); the trainers restart from {ckpt}/iter_00001; "
                    rf"iteration 1 to redo", lines[1]), lines
    assert [p.name for p in ckpt.iterdir() if p.name.startswith("iter_")] == ["iter_00002"]  # keep 1


def test_no_restart_left_exits_3_with_one_line(ray_cluster, tiny_world, tmp_path, capsys):
    """trainer.max_restarts=0: the reference's death stops the run with one line naming it and the command that
    goes on, exit status 3, no traceback."""
    import launch
    from bench import faults as fi

    inj = fi.install([fi.Fault("reference", "experience", 1)])
    try:
        args = SMALL + ["trainer.iterations=2", "trainer.save_every=1", "generation.num_instances=1",
                        "tracking.wandb=false", "data.eval.path=null", "trainer.max_restarts=0",
                        f"trainer.output_dir={tmp_path}"]
        code = launch.main(args)
    finally:
        inj.restore()
    err = capsys.readouterr().err
    assert code == 3
    last = err.strip().splitlines()[-1]
    assert re.fullmatch(rf"reference died \(.+\) and trainer.max_restarts=0 are spent; last checkpoint "
                        rf"{tmp_path}/checkpoints/iter_00001; resume: python launch.py --config \S+tiny.yaml "
                        rf"{re.escape(' '.join(args))} trainer.resume=true", last), last
    assert "Traceback" not in err
