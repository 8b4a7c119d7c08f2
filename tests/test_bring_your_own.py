"""Bring your own prompts, reward and model: the Verl example config on the tiny world (a reward file's scores
reach the experience batch), every bad input stops with exit status 2 and one line (before Ray starts, or raised
inside a Ray actor), and a stop signal ends a run with one line."""
import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import launch
from configs.schema import CONFIG_DIR
from conftest import ROOT
from trainer.loop.data import PromptSampler

EXAMPLE = str(CONFIG_DIR / "tiny_verl.yaml")
QUICK = ["trainer.iterations=1", "trainer.prompts_per_iteration=4", "trainer.samples_per_prompt=2",
         "trainer.micro_batch_size=8", "generation.num_instances=1", "generation.max_slots=16", "trainer.save_every=0",
         "tracking.wandb=false", "tracking.progress=false"]


@pytest.fixture(scope="module")
def inputs(tiny_world, tmp_path_factory):
    """Verl-format Parquet files of the tiny task, reward files, and models the engine cannot take."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import GPT2Config, LlamaConfig

    from trainer.tiny.make_verl_data import write_verl_data

    root = tmp_path_factory.mktemp("byo")
    train, test = write_verl_data(root / "verl")
    rows = pq.read_table(train).slice(0, 4).to_pylist()
    rows[2]["reward_model"] = {"style": "rule", "ground_truth": None}
    pq.write_table(pa.Table.from_pylist(rows), root / "no_truth.parquet")
    pq.write_table(pa.Table.from_pylist([{"prompt": 17}, {"prompt": 18}]), root / "int_prompt.parquet")
    files = {"train": train, "test": test, "no_truth": root / "no_truth.parquet",
             "int_prompt": root / "int_prompt.parquet"}
    for name, body in {
        "probe": """
            evaluated = 0  # test rows scored in this process (the dry run's 4 are the driver's)

            def compute_score(data_source, solution_str, ground_truth, extra_info=None):
                global evaluated
                assert data_source == "tiny/sort" and isinstance(ground_truth, str), (data_source, ground_truth)
                if extra_info["split"] == "test":
                    evaluated += 1
                    if evaluated > 8:  # the reward actor scored 4 greedy + 4 sampled before iteration 0
                        raise ValueError("evaluation is closed")
                index = extra_info["index"]
                return {"score": (index % 5) / 4, "index": index, "train": float(extra_info["split"] == "train")}
        """,
        "raises": """
            def compute_score(data_source, solution_str, ground_truth, extra_info=None):
                return float(extra_info["difficulty"])
        """,
        "text": """
            def compute_score(data_source, solution_str, ground_truth, extra_info=None):
                return "high"
        """,
    }.items():
        files[name] = root / f"{name}.py"
        files[name].write_text(textwrap.dedent(body))
    no_template = root / "actor_no_template"  # the tiny actor's config and tokenizer, without a chat template
    no_template.mkdir()
    for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{tiny_world.actor_path}/{f}", no_template)
    files["no_template"] = no_template
    GPT2Config(vocab_size=18, n_embd=32, n_layer=1, n_head=2, architectures=["GPT2LMHeadModel"]).save_pretrained(
        root / "gpt2")
    files["gpt2"] = root / "gpt2"
    LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                architectures=["LlamaForCausalLM"]).save_pretrained(root / "draft32")
    files["draft32"] = root / "draft32"
    return files


def bad_cases(f):
    train = f"data.train.path={f['train']}"
    return [
        ([train, "trainer.reward_fn=nope/reward.py:compute_score"],
         f"reward error: trainer.reward_fn: file not found: {ROOT}/nope/reward.py"),
        ([train, "trainer.reward_fn=trainer/tiny/reward.py:score"],
         f"reward error: trainer.reward_fn: {ROOT}/trainer/tiny/reward.py has no function 'score' "
         "(functions: compute_score)"),
        ([train, f"trainer.reward_fn={f['raises']}"],
         f"reward error: {f['raises']}:compute_score raised on sample 0 ({f['train']} row 0): KeyError: "
         "'difficulty' (dry run at start-up: the ground truth as the response)"),
        ([train, f"trainer.reward_fn={f['text']}"],
         f"reward error: {f['text']}:compute_score returned 'high' (str) on sample 0 ({f['train']} row 0); "
         "expected a finite float or a dict with a 'score' key (dry run at start-up: the ground truth as the "
         "response)"),
        ([f"data.train.path={f['no_truth']}"],
         f"data error: {f['no_truth']} row 2: no ground truth at data.train.label_key 'reward_model.ground_truth', "
         "which trainer.reward_fn needs (columns: ability, data_source, extra_info, prompt, reward_model)"),
        ([train, f"model.actor={f['no_template']}"],
         f"data error: {f['train']} row 0: data.train.prompt_key 'prompt' holds chat messages but the actor's "
         "tokenizer has no chat template"),
        ([f"data.train.path={f['int_prompt']}", "trainer.reward_fn=null", "trainer.rm_weight=1"],
         f"data error: {f['int_prompt']} row 0: data.train.prompt_key 'prompt' holds int 17; expected a string or a "
         "list of {role, content} messages"),
        ([train, f"model.actor={f['gpt2']}"],
         f"config error: model.actor: model type 'gpt2' ({f['gpt2']}) is not supported by the generation engine "
         "(supported: llama, qwen2, qwen3, mistral)"),
        ([train, f"model.draft={f['draft32']}"],
         f"config error: model.draft: vocabulary size 32 ({f['draft32']}) != the actor's 18; speculative decoding "
         "needs one shared vocabulary"),
        ([train, "data.max_prompt_len=4"],
         f"data error: {f['train']}: all 4096 prompts are longer than data.max_prompt_len=4 (shortest 5, median 11, "
         "longest 68 tokens)"),
        ([train, "model.reward=null", "trainer.rm_weight=1"],
         "config error: model.reward: null (no reward model) needs trainer.rm_weight=0, got trainer.rm_weight=1"),
        ([train, "generation.memory_gb=0.04"],
         "config error: generation.kv_memory_gb: the K/V pool (29.9 MiB, the dense rows' bytes) + weights 24.8 MiB "
         "do not fit in 36.9 MiB (90% of 41.0 MiB, generation.memory_gb); set generation.kv_memory_gb to at most "
         "0.0118 (1,454 tokens)"),
        ([train, "generation.memory_gb=0.04", "generation.kv_cache=dense"],
         "config error: generation.max_slots=16 x generation.max_len=160: K/V 29.9 MiB + weights 24.8 MiB do not "
         "fit in 36.9 MiB (90% of 41.0 MiB, generation.memory_gb); the largest that fit: generation.max_slots=6 at "
         "this max_len, or generation.max_len=25 at this max_slots"),
    ]


CASES = ["missing file", "missing function", "raises", "not a number", "no ground truth", "no chat template",
         "wrong column type", "gpt2 actor", "draft vocabulary", "prompts too long", "reward null with rm_weight",
         "kv does not fit", "dense kv does not fit"]


@pytest.mark.parametrize("case", range(len(CASES)), ids=CASES)
def test_bad_input_exits_2_with_one_line(inputs, capsys, case):
    """The preflight finds each of these before Ray starts (no cluster here: none is needed)."""
    overrides, line = bad_cases(inputs)[case]
    code = launch.main(["--config", EXAMPLE, *QUICK, "data.eval.path=null", *overrides])
    err = capsys.readouterr().err.strip().splitlines()
    assert (code, err) == (2, [line])


def test_verl_example_iteration_then_an_error_inside_the_reward_actor(ray_cluster, inputs, tmp_path):
    """configs/tiny_verl.yaml for one iteration with a reward file whose scores follow from each row's extra_info:
    the experience batch's rewards are reward_fn_weight x those scores, extra keys are metrics, evaluation uses
    the same function. Then the function raises inside the reward actor (final evaluation): exit status 2 and
    one line, no traceback."""
    from trainer.loop.tracking import read_wandb_history

    out = subprocess.run([sys.executable, "launch.py", "--config", EXAMPLE, *QUICK, "tracking.wandb=true",
                          "model.draft=null", "generation.strategy=none",  # rewards only: no draft trainer
                          f"data.train.path={inputs['train']}", f"data.eval.path={inputs['test']}",
                          "data.eval.size=4", f"trainer.reward_fn={inputs['probe']}", "trainer.reward_fn_weight=2.0",
                          f"trainer.output_dir={tmp_path}"],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr.strip().splitlines()[-1] == (
        f"reward error: {inputs['probe']}:compute_score raised on sample 0 ({inputs['test']} row 0): "
        "ValueError: evaluation is closed")
    assert "Traceback" not in out.stdout + out.stderr
    assert "[iter 0] eval_score=" in out.stdout

    (run_file,) = glob.glob(f"{tmp_path}/wandb/offline-run-*/run-*.wandb")
    (first,) = read_wandb_history(run_file)
    rows = PromptSampler(list(range(4096)), 0, True).next_batch(4)  # the first batch's rows (seed 0, shuffled)
    assert first["score/mean"] == pytest.approx(np.mean([(i % 5) / 4 for i in rows]))
    assert first["reward/mean"] == pytest.approx(2.0 * first["score/mean"])  # Experience.scores: weighted
    assert first["score/index"] == pytest.approx(np.mean(rows)) and first["score/train"] == 1.0
    # evaluation (before the iteration): test.parquet rows 0..3, greedy and sampled
    assert first["eval/score"] == first["eval/sampled_score"] == pytest.approx(np.mean([0, 1, 2, 3]) / 4)
    assert first["eval/index"] == 1.5 and first["eval/train"] == 0.0


def test_reward_function_only_preflight_never_touches_the_tiny_world(tiny_world, inputs, tmp_path, monkeypatch):
    """model.reward null (or left at tiny but unused: rm_weight 0) and model.draft null with every other path
    given: the preflight passes on an empty cache and builds nothing there (the run proper: the SIGTERM test)."""
    from configs.schema import load_config
    from trainer.loop.preflight import preflight

    cache = tmp_path / "tiny"
    monkeypatch.setenv("RLHFSPEC_CACHE", str(cache))
    for reward in ("null", "tiny"):
        cfg = load_config(EXAMPLE, [f"model.actor={tiny_world.actor_path}", "model.draft=null",
                                    f"model.reward={reward}", "generation.strategy=none",
                                    f"data.train.path={inputs['train']}", f"data.eval.path={inputs['test']}",
                                    "data.eval.size=4"])
        checked = preflight(cfg, log=lambda *a, **k: None)
        assert (checked.paths.draft, checked.paths.reward, len(checked.eval_prompts)) == (None, None, 4)
        assert not cache.exists()


def test_preflight_checks_prompts_before_torch_where_it_can(tiny_world, inputs, tmp_path):
    """Prompts too long for data.max_prompt_len: with tokenizer.json, the light check finds it (before torch or
    transformers load); without, it leaves the check to transformers' tokenizer (False, nothing raised)."""
    from configs.schema import load_config
    from trainer.loop.data import DataError
    from trainer.loop.preflight import check_prompts_light, resolve_paths

    cfg = load_config(EXAMPLE, [f"data.train.path={inputs['train']}", "data.eval.path=null"])
    assert check_prompts_light(cfg, resolve_paths(cfg))
    cfg.data.max_prompt_len = 4
    with pytest.raises(DataError, match="all 4096 prompts are longer than data.max_prompt_len=4"):
        check_prompts_light(cfg, resolve_paths(cfg))
    no_json = tmp_path / "actor"
    shutil.copytree(tiny_world.actor_path, no_json, ignore=shutil.ignore_patterns("*.safetensors", "tokenizer.json"))
    cfg.model.actor = str(no_json)
    assert not check_prompts_light(cfg, resolve_paths(cfg))


def test_a_stop_signal_names_the_iteration_and_phase():
    """The handler reads what was running off the interrupted stack: the driver loop's iteration and phase."""
    from trainer.loop import stop

    def fit():  # the Driver's names, as the handler finds them
        for iteration in range(2, 4):  # noqa: B007 - read off the frame
            if iteration == 3:
                return generate()

    def generate():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends

    handlers = stop.install()
    try:
        with pytest.raises(stop.Interrupted) as got:
            fit()
    finally:
        stop.restore(handlers)
    assert (got.value.where, got.value.exit_status) == ("iteration 3 (generate)", 143)
    assert stop.last() is got.value  # kept for launch.py: inside ray.get, Ray raises its own KeyboardInterrupt
    assert got.value.line(None) == "interrupted during iteration 3 (generate); no checkpoint yet"
    assert signal.getsignal(signal.SIGTERM) == handlers[signal.SIGTERM]


def test_sigterm_ends_a_reward_function_only_run_with_one_line(ray_cluster, tiny_world, inputs, tmp_path):
    """A run with a reward function alone (model.reward null) and plain decoding (model.draft null) on explicit
    paths, with an empty tiny-world cache: SIGTERM once iteration 0's checkpoint is in ends the run with one line
    naming iteration 1 and that checkpoint, exit status 143, no traceback or native stack dump; nothing built
    the tiny world."""
    cache, run_dir = tmp_path / "cache" / "tiny", tmp_path / "run"
    with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "launch.py", "--config", EXAMPLE, *QUICK, "trainer.iterations=4", "trainer.save_every=1",
             f"model.actor={tiny_world.actor_path}", "model.draft=null", "model.reward=null",
             "generation.strategy=none", f"data.train.path={inputs['train']}", "data.eval.path=null",
             f"trainer.output_dir={run_dir}"],
            stdout=out, stderr=err, cwd=ROOT, env={**os.environ, "RLHFSPEC_CACHE": str(cache)})
        deadline = time.time() + 600
        while not (run_dir / "checkpoints" / "latest").exists():  # iteration 0 is done: iteration 1 has begun
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "err").read_text()[-3000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=300) == 143, (tmp_path / "err").read_text()[-3000:]
    stdout, stderr = (tmp_path / "out").read_text(), (tmp_path / "err").read_text()
    assert "reward model none" in stdout and "draft none (plain decoding)" in stdout
    assert re.fullmatch(r"interrupted during iteration 1( \((generate|make_experience|update|weight sync)\))?; "
                        rf"last checkpoint {run_dir}/checkpoints/iter_00001", stderr.strip().splitlines()[-1])
    for dump in ("Traceback", "Fatal Python error", "*** SIG", "Stack trace"):
        assert dump not in stdout + stderr
    assert not cache.exists()
