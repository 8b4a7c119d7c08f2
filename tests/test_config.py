"""Config loading: overrides apply, and every bad value stops with one line naming the key."""
import subprocess
import sys

import pytest

from configs.schema import CONFIG_DIR, ConfigError, load_config


def test_defaults_and_overrides():
    cfg = load_config(None, ["trainer.actor_lr=2e-6", "generation.num_instances=3", "tracking.run_name=x",
                             "trainer.rule_reward=null"])
    assert cfg.trainer.actor_lr == 2e-6 and isinstance(cfg.trainer.actor_lr, float)
    assert cfg.generation.num_instances == 3
    assert cfg.tracking.run_name == "x"
    assert cfg.trainer.rule_reward is None
    assert cfg.model.actor == "tiny"


def test_cluster_example_is_valid():
    cfg = load_config(CONFIG_DIR / "cluster_8b.yaml")
    assert cfg.generation.num_instances == 8 and cfg.trainer.zero_stage == 3
    assert cfg.generation.gpus_per_instance == 1


@pytest.mark.parametrize("override, message", [
    ("trainer.lrr=1", "trainer.lrr: unknown key"),
    ("generation.num_instances=-2", "generation.num_instances: must be positive, got -2"),
    ("generation.num_instances=two", "generation.num_instances: expected int, got str 'two'"),
    ("generation.num_instances=true", "generation.num_instances: expected int, got bool"),
    ("generation.max_len=64", "generation.max_len: 64 leaves no room for a response after data.max_prompt_len=80"),
    ("generation.max_new_tokens=500", "generation.max_new_tokens: 500 does not fit"),
    ("generation.strategy=tree:3", "generation.strategy: 'tree:3' is not none"),
    ("generation.top_p=1.5", "generation.top_p: must be in (0, 1]"),
    ("trainer.algorithm=dpo", "trainer.algorithm: 'dpo' is not one of ppo, grpo"),
    ("trainer.zero_stage=4", "trainer.zero_stage: must be 0..3"),
    ("trainer.samples_per_prompt=1", "trainer.samples_per_prompt: GRPO needs at least 2"),
    ("nosection.x=1", "nosection: unknown key"),
    ("generation=3", "generation: expected a mapping"),
    ("oops", "override 'oops': expected key.sub=value"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert str(err.value).startswith(message.split(":")[0])
    assert message in str(err.value)


def test_critic_warmup_must_leave_policy_updates():
    with pytest.raises(ConfigError, match="trainer.critic_warmup: 16 leaves no policy update"):
        load_config(None, ["trainer.algorithm=ppo", "trainer.critic_warmup=16", "trainer.iterations=16"])


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_draft_vocab_mismatch_is_named(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from trainer.preflight import RunPaths, check_models

    def save(cls, vocab, name, **kw):
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                          pad_token_id=0, **kw)
        cls(cfg).save_pretrained(tmp_path / name)
        return str(tmp_path / name)

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a"}\n')
    paths = RunPaths(actor=save(LlamaForCausalLM, 32, "actor"), draft=save(LlamaForCausalLM, 48, "draft"),
                     reward=save(LlamaForSequenceClassification, 32, "rm", num_labels=1), train_prompts=str(prompts),
                     eval_prompts=None)
    cfg = load_config(None, ["trainer.rm_weight=1.0"])
    with pytest.raises(ConfigError, match=r"model.draft: vocabulary size 48 != actor's 32"):
        check_models(cfg, paths)
    paths.draft = paths.actor
    paths.reward = paths.actor  # a causal LM where a reward model belongs
    with pytest.raises(ConfigError, match=r"model.reward: .* not a sequence-classification"):
        check_models(cfg, paths)
    paths.reward = str(tmp_path / "missing")
    with pytest.raises(ConfigError, match=r"model.reward: model directory not found: .*missing"):
        check_models(cfg, paths)


def test_too_many_instances_for_the_cluster():
    from trainer.preflight import check_resources

    cfg = load_config(None, ["generation.num_instances=40", "generation.cpus_per_instance=1"])
    with pytest.raises(ConfigError, match=r"generation.num_instances=40 .* needs 40.75 CPU but the Ray cluster has 8"):
        check_resources(cfg, {"CPU": 8.0})
    gpu = load_config(CONFIG_DIR / "cluster_8b.yaml")
    with pytest.raises(ConfigError, match=r"needs 26 GPU but the Ray cluster has 0"):
        check_resources(gpu, {"CPU": 1000.0})


def test_launch_reports_bad_config_in_one_line():
    out = subprocess.run([sys.executable, "launch.py", "generation.num_instances=0"], capture_output=True,
                         text=True, cwd=CONFIG_DIR.parent, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == "config error: generation.num_instances: must be positive, got 0"
