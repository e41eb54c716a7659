"""The DeepSpeed engine (`engine=deepspeed`): the same model, batches, loss and checkpoints as
`engines/megatron.py`, with DeepSpeed ZeRO-2 or ZeRO-3 doing the data parallelism.

    torchrun --nproc_per_node=2 launch/train.py +experiment=tiny engine=deepspeed engine.zero_stage=3

What is the same as the megatron engine:
  - the model: megatron-core's spec-built VLM at tp = pp = 1 (its local linear layers are plain
    autograd functions on whole weights, which ZeRO-3's module hooks gather and release like any
    nn.Linear), initialised by the same layout-independent `init_weights`, frozen per stage;
  - the loss: Σ token CE over the global batch / its label-token count G (all-reduced before the
    forward). DeepSpeed *averages* gradients over the dp ranks, so each micro-batch backpropagates
    `dp · Σ CE / G` (and `backward(scale_wrt_gas=False)`): the reduced gradient is the gradient of the
    global per-token mean, whatever the micro-batch count — exact for a power-of-two dp;
  - the optimizer: torch AdamW with the same parameter groups (`engines/common.py`: per-module peak learning rates,
    no decay on norms and biases), the same schedule (set per group before each step), global-norm
    clipping (`gradient_clipping`, DeepSpeed's clip uses the same `clip / (norm + 1e-6)` factor);
    a step with a non-finite gradient is skipped (DeepSpeed's overflow check) and reported;
  - checkpoints: `sharded_state_dict` gives megatron-core ShardedTensors of the *full* weights
    (gathered under ZeRO-3) and, per parameter name, the full fp32 AdamW moments assembled from the
    ZeRO partitions — the megatron engine's `per_param` format, so `export-hf`, `model.init_from` and
    (in fp32) a megatron-engine resume all read them. With bf16 the fp32 master weights are saved
    as well (`optimizer.<key>.fp32_param`, format `deepspeed_bf16`) so a resume continues exactly.

Micro-batches without media: a rank whose micro-batch has no image or video still runs the ViT and
projector, on one dummy image (`IdleMedia`: the smallest grid the generation accepts, zero pixels),
and adds 0 · Σ(output) to its embeddings. ZeRO-3 gathers each module's parameters with a collective
in its forward hook (and again in backward), so a ViT skipped on one rank but run on another pairs
the ViT's all-gathers with the LLM's and deadlocks or mixes tensors; ZeRO-2 reduces gradients in the
order its hooks fire. With the dummy every rank runs the same modules in the same order; the ViT's
gradient from such a micro-batch is exactly zero (what the megatron engine, which skips the ViT,
fills in). Evaluation takes the same path.

Not available here (refused in `TrainConfig.validate`): tensor / pipeline / context / expert
parallelism, MoE models, LoRA and FP8 — use `engine=megatron` for those. `engine.offload_optimizer=cpu`
keeps the optimizer state in host memory with torch's AdamW (DeepSpeedCPUAdam's compiled op is not
required: `zero_force_ds_cpu_optimizer=false`).
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import replace

import torch
import torch.distributed as dist

from data_pipelines.schema import PackedBatch
from qvl_train.config import EngineConfig, ModelConfig, OptimConfig, ParallelConfig, StageConfig
from qvl_train.engines.base import StepResult
from qvl_train.engines.common import MODULES, apply_stage, llm_lr, module_lrs, module_of, param_groups, step_counts
from qvl_train.loss import global_token_mean
from qvl_train.parallel.dims import ParallelDims

MOMENTS = ("exp_avg", "exp_avg_sq")


def deepspeed_config(engine_cfg: EngineConfig, optim_cfg: OptimConfig, dtype: torch.dtype, micro_per_rank: int) -> dict:
    """The DeepSpeed config dict of a run, built from our typed config (users never write JSON).

    One micro-batch is one packed sequence; the engine marks the accumulation boundary itself."""
    zero: dict = {"stage": engine_cfg.zero_stage, "overlap_comm": False, "contiguous_gradients": True}
    if engine_cfg.zero_stage == 3:
        zero["stage3_param_persistence_threshold"] = engine_cfg.param_persistence_threshold
    if engine_cfg.offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": micro_per_rank,
        "gradient_clipping": optim_cfg.clip_grad,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "zero_allow_untested_optimizer": True,  # torch AdamW with our parameter groups
        "zero_force_ds_cpu_optimizer": False,  # offload works with torch AdamW; no compiled op needed
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def _init_deepspeed_comm() -> None:
    """DeepSpeed's communication layer over the process group train.py created (gloo on CPU, NCCL on GPU).

    Its CPU backend would JIT-compile a shared-memory all-reduce (C++, about a minute, a compiler
    needed) that only DeepSpeed *inference* uses; training collectives go through torch.distributed,
    so that build is skipped (qvl_train/compat/deepspeed_comm.py)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    from qvl_train.compat.deepspeed_comm import skip_shm_build

    # DeepSpeed calls the collectives that torch 2.13 renamed: one FutureWarning per call and step otherwise
    warnings.filterwarnings("ignore", r"`torch\.distributed\.\w+` is deprecated", FutureWarning)
    with skip_shm_build():
        deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(), dist_init_required=False)


class DeepSpeedEngine:
    """Builds the whole model on every rank, wraps it with `deepspeed.initialize`; runs `train_step`."""

    def __init__(
        self,
        model_cfg: ModelConfig,
        parallel_cfg: ParallelConfig,
        optim_cfg: OptimConfig,
        stage_cfg: StageConfig,
        engine_cfg: EngineConfig,
        dims: ParallelDims,
        *,
        seed: int,
        max_steps: int,
        micro_batches_per_step: int,
        dtype: torch.dtype = torch.float32,
        recompute: str = "none",
    ) -> None:
        import deepspeed
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        from qvl_train.models import Execution, build_model, init_weights

        self.dims, self.optim_cfg, self.max_steps, self.model_cfg = dims, optim_cfg, max_steps, model_cfg
        self.zero_stage, self.dtype = engine_cfg.zero_stage, dtype
        torch.manual_seed(seed)
        model_parallel_cuda_manual_seed(seed)
        model = build_model(
            model_cfg, parallel_cfg, pre_process=True, post_process=True, dtype=dtype,
            execution=Execution(recompute=recompute),
        ).to(dims.device)
        init_weights(model, seed, model_cfg.init_std)
        apply_stage(model, stage_cfg)
        optimizer = torch.optim.AdamW(
            param_groups(model.named_parameters(), optim_cfg),
            lr=optim_cfg.lr, betas=(optim_cfg.beta1, optim_cfg.beta2), eps=optim_cfg.eps,
        )
        config = deepspeed_config(engine_cfg, optim_cfg, dtype, micro_batches_per_step // dims.dp)
        _init_deepspeed_comm()
        self.ds, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        self.model = self.ds.module
        IdleMedia(self.model, model_cfg).install()
        self._params = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    # ----------------------------------------------------------------- info
    def parameter_counts(self) -> tuple[int, int]:
        """(trainable, total) parameters of the whole model (ZeRO-3: the full sizes, not the partitions)."""
        sizes = [(getattr(p, "ds_numel", p.numel()), p.requires_grad) for p in self.model.parameters()]
        return sum(n for n, t in sizes if t), sum(n for n, _ in sizes)

    @property
    def optimizer_format(self) -> str:
        """`per_param` (the megatron engine's format) in fp32; with bf16 the fp32 masters come too."""
        return "deepspeed_bf16" if self.dtype == torch.bfloat16 else "per_param"

    def check_optimizer_format(self, saved: str) -> None:
        """Refuse a checkpoint whose optimizer state this engine cannot read, saying what to do."""
        if saved != self.optimizer_format:
            raise RuntimeError(
                f"the checkpoint's optimizer state has format {saved!r}, this run "
                f"({'bf16' if self.dtype == torch.bfloat16 else 'fp32'} "
                f"engine=deepspeed) reads {self.optimizer_format!r}: resume with the engine and train.dtype that wrote it, or "
                "start a new output_dir with model.init_from=<checkpoint> to take its weights with a fresh optimizer"
            )

    def current_lr(self) -> float:
        """The LLM's learning rate (DeepSpeed keeps our parameter groups and their `module` keys)."""
        return llm_lr(self.optimizer)

    # ----------------------------------------------------------------- step
    def train_step(self, batches: list[PackedBatch], step: int) -> StepResult:
        counts = step_counts(batches, self.model_cfg, self.dims)
        denom = float(max(counts["label_tokens"], 1))
        device = self.dims.device
        t0 = time.perf_counter()
        self.ds.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        for i, batch in enumerate(batches):
            self.ds.set_gradient_accumulation_boundary(i == len(batches) - 1)
            batch = batch.to(device)
            loss, _, report = global_token_mean(self.ds(batch), batch.num_label_tokens, denom)
            # DeepSpeed averages over dp ranks: scale so the average is the global per-token mean's gradient
            self.ds.backward(loss * self.dims.dp, scale_wrt_gas=False)
            loss_sum += report["loss_sum"].double()
        t1 = time.perf_counter()
        dist.all_reduce(loss_sum)
        loss = float(loss_sum) / denom
        grad_norm, module_norms = self._grad_norms()
        lrs = module_lrs(step, self.optim_cfg, self.max_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lrs[group["module"]]
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        self.ds.step()  # a non-finite gradient: DeepSpeed's overflow check skips the update and clears it
        self.ds.set_gradient_accumulation_boundary(False)
        t2 = time.perf_counter()
        return StepResult(
            loss=loss, grad_norm=grad_norm, module_grad_norms=module_norms, skipped=not finite,
            timings={"fwd_bwd_s": t1 - t0, "optimizer_s": t2 - t1}, lrs=lrs, **counts,
        )

    def eval_step(self, batches: list[PackedBatch]) -> tuple[float, int]:
        """Forward only → (Σ token cross-entropy, label tokens) summed over every rank."""
        sums = torch.zeros(2, dtype=torch.float64, device=self.dims.device)
        self.ds.eval()
        with torch.no_grad():
            for batch in batches:
                sums[0] += self.ds(batch.to(self.dims.device)).double().sum()
                sums[1] += batch.num_label_tokens
        self.ds.train()
        dist.all_reduce(sums)
        return float(sums[0]), int(sums[1])

    def _local_grad(self, p: torch.nn.Parameter):
        """This rank's partition of the reduced gradient of `p` (each element on exactly one rank)."""
        if self.zero_stage == 3:
            from deepspeed.utils import safe_get_local_grad

            return safe_get_local_grad(p)
        mapping = getattr(p, "_hp_mapping", None)
        if mapping is None:
            return None
        grad = mapping.get_lp_grad_fragment(p._index_in_param_group).flatten()
        address = mapping.lp_fragment_address
        if grad.numel() == p.numel() != address.numel:  # a full accumulation buffer: this rank's part only
            grad = grad.narrow(0, address.start, address.numel)
        return grad

    def _grad_norms(self) -> tuple[float, dict[str, float]]:
        """Global L2 norm per module (vision / projector / llm) from the ZeRO partitions: one all-reduce."""
        sq = torch.zeros(len(MODULES), dtype=torch.float64, device=self.dims.device)
        for name, p in self._params:
            g = self._local_grad(p)
            if g is not None and g.numel():
                sq[MODULES.index(module_of(name))] += torch.linalg.vector_norm(g.detach().double()) ** 2
        dist.all_reduce(sq)
        return math.sqrt(float(sq.sum())), {m: math.sqrt(v) for m, v in zip(MODULES, sq.tolist())}

    def full_grads(self) -> dict[str, torch.Tensor]:
        """Every trainable parameter's reduced gradient at full shape (all ranks; tests and tools)."""
        from deepspeed.utils import safe_get_full_grad

        return {name: safe_get_full_grad(p).detach().float().clone() for name, p in self._params}

    # ------------------------------------------------------------ checkpoint
    def _gathered(self, modifier_rank=None):
        """ZeRO-3: the full weights on every rank inside the block (written back from `modifier_rank`)."""
        if self.zero_stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=modifier_rank)

    def sharded_state_dict(self, with_optimizer: bool = True, is_loading: bool = False) -> dict:
        """Full weights and (per parameter name) full fp32 AdamW moments as megatron ShardedTensors,
        keyed as the megatron engine keys them; tensors are copies (ZeRO-3 releases its gathers)."""
        from megatron.core.dist_checkpointing import ShardedTensor
        from megatron.core.dist_checkpointing.dict_utils import nested_values
        from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

        with self._gathered():
            model_sd = self.model.sharded_state_dict()
            by_param = {}
            for sh in nested_values(model_sd):
                if isinstance(sh, (ShardedTensor, ShardedTensorFactory)):
                    by_param[id(sh.data)] = sh
                    sh.data = sh.data.detach().clone()
        out: dict = {"model": model_sd}
        if not with_optimizer:
            return out
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        state: dict = {}
        self._optimizer_states()
        for name, p in self._params:
            sh = by_param[id(p)]
            for moment in MOMENTS:
                data = torch.zeros(sh.data.shape) if is_loading else safe_get_full_optimizer_state(p, moment).clone()
                state[f"{name}.{moment}"] = _fp32_like(sh, f"optimizer.{sh.key}.{moment}", data)
            if self.dtype == torch.bfloat16:
                data = torch.zeros(sh.data.shape) if is_loading else safe_get_full_fp32_param(p).clone()
                state[f"{name}.fp32_param"] = _fp32_like(sh, f"optimizer.{sh.key}.fp32_param", data)
        out["optimizer"] = state
        return out

    def load_sharded(self, loaded: dict, with_optimizer: bool) -> None:
        """Weights into the (ZeRO-3: gathered) model and its fp32 masters; with the optimizer, the moments."""
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        with self._gathered(modifier_rank=0):
            missing, _ = self.model.load_state_dict(loaded["model"], strict=False)
            weights = {n: p.detach().float().clone() for n, p in self._params}
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing:
            raise RuntimeError(f"checkpoint lacks model tensors: {missing[:8]}")
        opt = loaded.get("optimizer", {}) if with_optimizer else {}
        self._optimizer_states()
        for name, p in self._params:
            safe_set_full_fp32_param(p, opt.get(f"{name}.fp32_param", weights[name]).float())
            for moment in MOMENTS if with_optimizer else ():
                safe_set_full_optimizer_state(p, opt[f"{name}.{moment}"].float(), moment)

    def _optimizer_states(self) -> list[dict]:
        """AdamW's state of every flat partition this rank steps, created as zeros before the first step
        (torch AdamW creates it lazily; a resume writes into it), and linked to the parameters'
        fragments (DeepSpeed ZeRO-2 links only the first parameter group on its own)."""
        zero, inner = self.optimizer, self.optimizer.optimizer
        flats = zero.fp32_partitioned_groups_flat if self.zero_stage == 3 else zero.single_partition_of_fp32_groups
        for flat in flats:
            st = inner.state[flat]
            if "exp_avg" not in st:
                st.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(flat), exp_avg_sq=torch.zeros_like(flat))
        if self.zero_stage != 3:
            zero._hp_optimizer_states_linked = False
            zero._lazy_init_hp_params_optimizer_state()
        return [inner.state[flat] for flat in flats]

    def optimizer_step_count(self) -> int:
        for st in self._optimizer_states():
            if "step" in st:
                return int(st["step"])
        return 0

    def set_optimizer_step_count(self, n: int) -> None:
        for st in self._optimizer_states():
            if "step" in st:
                st["step"] = torch.tensor(float(n)) if torch.is_tensor(st["step"]) else n


class IdleMedia:
    """Runs the ViT and projector on a dummy image in micro-batches without media (see the module
    docstring: every rank must run the same modules, in the same order, under ZeRO).

    Generation-agnostic: the dummy goes through the model's own `embed_for_llm` (DeepStack mergers
    included), with the token embedding replaced by zeros (it ran already, and must not run twice)
    and the media positions by the first rows. Its visual embeddings join the real ones times zero;
    DeepStack features, where the model has them, go to the LLM as zero-row features, so the LLM takes
    the same DeepStack layer loop as on a rank with media (and backpropagates into the mergers there)."""

    def __init__(self, model, model_cfg: ModelConfig) -> None:
        self.model, v = model, model_cfg.vision
        # the smallest accepted image: one merge group, or the fixed size of a fixed-resolution ViT
        side = v.image_size // v.patch_size if v.image_size else v.spatial_merge_size
        self.grid_thw = torch.tensor([[1, side, side]])
        self.width = v.in_channels * v.temporal_patch_size * v.patch_size**2
        self.pad_id, self.hidden = model_cfg.image_pad_id, model_cfg.llm.hidden_size
        self.original = model.embed_for_llm

    def install(self) -> None:
        self.model.embed_for_llm = self.embed_for_llm

    def dummy(self, device) -> PackedBatch:
        """One zero image; as many text slots as patches (at least its visual token count)."""
        n = int(self.grid_thw.prod())
        zeros = torch.zeros(n, dtype=torch.long, device=device)
        return PackedBatch(
            input_ids=torch.full((n,), self.pad_id, device=device), labels=zeros, position_ids=zeros.expand(3, n),
            cu_seqlens=torch.tensor([0, n], dtype=torch.int32, device=device),
            pixel_values=torch.zeros(n, self.width, device=device), grid_thw=self.grid_thw.to(device), sample_ids=[],
        )

    def embed_dummy(self, like: torch.Tensor):
        """(`[n, 1, H]` zeros with the dummy's visual embeddings in the first rows, DeepStack or None)."""
        model, rows = self.model, []
        encode_media = model.encode_media

        def encode(batch, fn):
            out = encode_media(batch, fn)
            rows.append(out.shape[0])
            return out

        model.encode_media = encode
        model.media_positions = lambda ids: torch.arange(rows[-1], device=ids.device)
        model.llm.embed = lambda ids: like.new_zeros(ids.numel(), 1, self.hidden)
        try:
            return self.original(self.dummy(like.device))
        finally:
            del model.encode_media, model.media_positions, model.llm.embed  # the class's methods again

    def embed_for_llm(self, batch: PackedBatch):
        hidden, deepstack = self.original(batch)
        if batch.pixel_values.numel() == 0:
            h_dummy, deep_dummy = self.embed_dummy(hidden)
            hidden = hidden + 0.0 * h_dummy.sum()
            if deep_dummy is not None and deepstack is None:
                positions, features = deep_dummy
                deepstack = (positions[:0], [f[:0] for f in features])
        return hidden, deepstack


def _fp32_like(sh, key: str, data: torch.Tensor):
    """The weight's sharded entry (ShardedTensor, or a factory such as SwiGLU's [gate; up] split) for an
    fp32 tensor of the same shape (the moments and masters stay fp32 when the weights are bf16)."""
    from megatron.core.dist_checkpointing import ShardedTensor

    extra = {"dtype": data.dtype} if isinstance(sh, ShardedTensor) else {}
    return replace(sh, key=key, data=data, **extra)
