"""DeepSpeed set-up in one place (what OpenRLHF calls its DeepspeedStrategy): process group, engine, ZeRO, save/load.

Model code never touches DeepSpeed. The same calls run CPU+gloo and CUDA+NCCL (bf16/fp16 when configured).
Also the one place that loads the HF models the training roles use, failing fast on a bad path.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import os
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist

from migration.collective import tcp_store

CAUSAL_LM = "causal_lm"
SEQ_CLS = "sequence_classification"


# --------------------------------------------------------------------------------------------- models
def check_model_dir(path: str | os.PathLike, role: str) -> "transformers.PretrainedConfig":  # noqa: F821
    """Read a model dir's config, or fail at once with an error naming the role and the path."""
    from transformers import AutoConfig

    if path is None or not Path(path).is_dir():
        raise FileNotFoundError(f"{role} model path {str(path)!r} is not a directory")
    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"{role} model path {str(path)!r} has no config.json (not a save_pretrained dir)")
    try:
        return AutoConfig.from_pretrained(path)
    except Exception as e:  # malformed config: keep the path in the message
        raise ValueError(f"{role} model path {str(path)!r}: cannot read its config: {e}") from e


def _architectures(config) -> list[str]:
    return list(getattr(config, "architectures", None) or [])


def resolve_dtype(device: str | torch.device, dtype: str | torch.dtype | None) -> torch.dtype:
    """The compute dtype: bf16/fp16 only on CUDA (CPU always runs fp32); None = fp32, "auto" = bf16 on CUDA."""
    if torch.device(device).type != "cuda" or dtype is None:
        return torch.float32
    if dtype == "auto":
        return torch.bfloat16
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ValueError(f"dtype must be one of {sorted(names)}, got {dtype!r}")
    return names[dtype]


def load_causal_lm(path: str, role: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """An AutoModelForCausalLM from a save_pretrained dir (policy, reference)."""
    from transformers import AutoModelForCausalLM

    config = check_model_dir(path, role)
    archs = _architectures(config)
    if archs and not any(a.endswith("ForCausalLM") for a in archs):
        raise ValueError(f"{role} model at {path!r} is {archs}, expected a *ForCausalLM model")
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)


def load_scalar_head_model(path: str, role: str, init_from: str = "reward", dtype: torch.dtype = torch.float32):
    """A *ForSequenceClassification model with a 1-output `score` head (reward model, critic).

    init_from="reward": the dir must hold such a model (num_labels == 1).
    init_from="actor": the dir holds a causal LM; its backbone is loaded and the value head starts fresh.
    """
    from transformers import AutoModelForSequenceClassification

    config = check_model_dir(path, role)
    archs = _architectures(config)
    if init_from == "reward":
        if not any(a.endswith("ForSequenceClassification") for a in archs):
            raise ValueError(
                f"{role} model at {path!r} is {archs or 'of unknown architecture'}, expected a "
                "*ForSequenceClassification model with num_labels=1 (a causal LM cannot be used as a reward model)"
            )
        if config.num_labels != 1:
            raise ValueError(f"{role} model at {path!r} has num_labels={config.num_labels}, expected 1")
        model = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype)
    elif init_from == "actor":
        if archs and not any(a.endswith("ForCausalLM") for a in archs):
            raise ValueError(f"{role} init_from='actor' but the model at {path!r} is {archs}, not a *ForCausalLM")
        config.num_labels = 1
        model = AutoModelForSequenceClassification.from_pretrained(path, config=config, dtype=dtype)
        hidden = model.score.in_features
        torch.nn.init.normal_(model.score.weight, std=1.0 / (hidden + 1) ** 0.5)  # fresh value head
    else:
        raise ValueError(f"{role} init_from must be 'reward' or 'actor', got {init_from!r}")
    head = getattr(model, "score", None)
    if not isinstance(head, torch.nn.Linear) or head.out_features != 1:
        raise ValueError(f"{role} model at {path!r}: expected a linear `score` head with one output")
    if model.config.pad_token_id is None:  # HF's own pooled forward needs it; our forwards use the mask
        model.config.pad_token_id = 0
    return model


# ------------------------------------------------------------------------------------------- strategy
class DeepSpeedBackend:
    """Owns the process group and the DeepSpeed engines of one training role on one rank."""

    def __init__(self, device: str = "cpu", seed: int = 0) -> None:
        self.device = torch.device(device)
        self.seed = seed
        self.rank, self.world_size = 0, 1
        self.zero_stage = 0

    # -- process group
    def setup_distributed(self, rank: int, world_size: int, master_addr: str, master_port: int) -> None:
        """Join the role's process group: NCCL on CUDA, gloo on CPU; env vars set for DeepSpeed too."""
        if self.device.type == "cpu":  # said, not detected: DeepSpeed warns when it falls back to CPU itself
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed

        self.rank, self.world_size = rank, world_size
        os.environ.update(
            RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_RANK="0",  # under Ray each rank sees exactly its own device(s)
            MASTER_ADDR=str(master_addr),
            MASTER_PORT=str(master_port),
        )
        if self.device.type == "cuda":
            torch.cuda.set_device(0 if self.device.index is None else self.device.index)
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        # the default group on a store that listens on master_addr only (torch's own listens on every interface);
        # DeepSpeed finds the group initialised and adopts it
        store = tcp_store(str(master_addr), int(master_port), world_size, rank == 0, datetime.timedelta(minutes=30))
        torch.distributed.init_process_group(backend, store=store, rank=rank, world_size=world_size)
        # on CPU DeepSpeed builds its shared-memory op here and print()s that it did, from every rank
        with contextlib.redirect_stdout(io.StringIO()):
            deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
        torch.manual_seed(self.seed)

    # -- engine
    def ds_config(
        self, zero_stage: int, micro_batch_size: int, grad_accum: int, max_norm: float, bf16: bool, fp16: bool = False
    ) -> dict:
        zero = {"stage": zero_stage}
        if self.device.type == "cpu":
            zero.update(overlap_comm=False, contiguous_gradients=False)  # no CUDA streams on CPU
        if zero_stage == 3:
            zero.update(stage3_gather_16bit_weights_on_model_save=True)
        return {
            "train_micro_batch_size_per_gpu": micro_batch_size,
            "gradient_accumulation_steps": grad_accum,
            "train_batch_size": micro_batch_size * grad_accum * self.world_size,
            "gradient_clipping": max_norm if max_norm and max_norm > 0 else 0.0,
            "zero_optimization": zero,
            "bf16": {"enabled": bool(bf16)},
            "fp16": {"enabled": bool(fp16), "initial_scale_power": 16},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }

    def prepare(
        self,
        model: torch.nn.Module,
        lr: float,
        weight_decay: float = 0.0,
        zero_stage: int = 2,
        micro_batch_size: int = 1,
        grad_accum: int = 1,
        max_norm: float = 1.0,
        bf16: bool = False,
        betas: tuple[float, float] = (0.9, 0.95),
        fp16: bool = False,
    ):
        """Wrap a model and an AdamW into a DeepSpeed engine (ZeRO stage 0-3, gradient accumulation, clipping).

        The model comes in fp32; bf16 / fp16 (CUDA only) keep fp32 master weights in the optimizer.
        """
        import deepspeed

        if zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {zero_stage}")
        bf16 = bool(bf16) and self.device.type == "cuda"
        fp16 = bool(fp16) and self.device.type == "cuda" and not bf16
        self.zero_stage = zero_stage
        model = model.to(self.device)
        params = [p for p in model.parameters() if p.requires_grad]
        # torch's AdamW as DeepSpeed's client optimizer on both devices (fused kernel on CUDA): no JIT-built
        # DeepSpeed Adam op, so no CUDA toolkit needed on the cluster and one code path with the CPU tests.
        fused = self.device.type == "cuda"
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas, fused=fused)
        config = self.ds_config(zero_stage, micro_batch_size, grad_accum, max_norm, bf16, fp16)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        return engine

    def backward(self, loss: torch.Tensor, engine) -> None:
        engine.backward(loss)

    def step(self, engine) -> float | None:
        """Optimizer step at accumulation boundaries (DeepSpeed counts micro steps); returns the grad norm then."""
        boundary = engine.is_gradient_accumulation_boundary()
        # ZeRO 1-3 record the pre-clip norm; stage 0 with a client optimizer does not, so measure it here
        # (gradients are already all-reduced by engine.backward at the boundary).
        own_norm = _grad_norm(engine.module) if boundary and self.zero_stage == 0 else None
        engine.step()
        if not boundary:
            return None
        norm = own_norm if own_norm is not None else engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    # -- metrics
    def all_reduce_mean(self, metrics: dict[str, float]) -> dict[str, float]:
        """Average scalar metrics over the ranks of this group (every rank must call with the same keys)."""
        if not metrics or self.world_size == 1 or not dist.is_initialized():
            return dict(metrics)
        keys = sorted(metrics)
        t = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=self.comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return {k: v / self.world_size for k, v in zip(keys, t.tolist())}

    def comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    # -- checkpoints
    def save(self, engine, ckpt_dir: str, client_state: dict | None = None, tag: str = "latest_ckpt") -> None:
        """DeepSpeed checkpoint (weights + optimizer + scheduler); every rank must call."""
        Path(ckpt_dir).mkdir(parents=True, exist_ok=True)
        engine.save_checkpoint(ckpt_dir, tag=tag, client_state=client_state or {})

    def load(self, engine, ckpt_dir: str, tag: str | None = None) -> dict:
        """Restore a DeepSpeed checkpoint in place; returns its client_state. Every rank must call."""
        if not Path(ckpt_dir).is_dir():
            raise FileNotFoundError(f"checkpoint dir {ckpt_dir!r} does not exist")
        path, client_state = engine.load_checkpoint(
            ckpt_dir, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint found in {ckpt_dir!r}")
        return client_state or {}

    def full_state_dict(self, engine) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, full tensor) for every parameter; under ZeRO-3 each is gathered, so every rank must iterate."""
        module = unwrap(engine)
        for name, param in module.named_parameters():
            if self.zero_stage == 3 and hasattr(param, "ds_id"):
                import deepspeed

                with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                    yield name, param.data.detach().clone()
            else:
                yield name, param.data.detach()

    def save_hf(self, model, tokenizer_path: str | None, out_dir: str) -> None:
        """Plain HF save_pretrained of the unwrapped module (+ tokenizer) on rank 0; loadable on its own.

        ZeRO 0-2: only rank 0 needs to call. ZeRO-3: every rank must call (parameters are gathered).
        """
        module = unwrap(model)
        state = {name: t.cpu() for name, t in self.full_state_dict(model)} if self.zero_stage == 3 else None
        if self.rank == 0:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            module.save_pretrained(out_dir, state_dict=state)
            if tokenizer_path:
                from transformers import AutoTokenizer

                AutoTokenizer.from_pretrained(tokenizer_path).save_pretrained(out_dir)


def unwrap(model) -> torch.nn.Module:
    """The HF module inside a DeepSpeed engine (or the module itself)."""
    return getattr(model, "module", model)


def _grad_norm(module: torch.nn.Module) -> float:
    norms = [p.grad.detach().float().norm() for p in module.parameters() if p.grad is not None]
    return torch.stack(norms).norm().item() if norms else 0.0
