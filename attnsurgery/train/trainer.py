"""One training loop for every trainable surgery (gates, temperatures, routers, feature maps) and LoRA.

A surgery declares trainable state by holding ``nn.Parameter``s and, optionally, a :meth:`Surgery.regularizer`;
LoRA is the ``lora`` surgery (peft). The trainer freezes every model weight, trains the surgeries' parameters
(``lr``; LoRA's at ``lora_lr``) on an objective from :mod:`.objectives` (settings: :mod:`.config`), and writes
a folder that is a recipe (:mod:`.runfolder`)::

    runs/x/recipe.yaml                 # surgeries, targets, data, objective, losses, validation scores
    runs/x/state-0-gated_attention.safetensors
    runs/x/checkpoint.pt               # resumable state (--resume), kept after the run

``patch(model, "runs/x")``, ``attnsurgery apply/eval --recipe runs/x`` and lm-eval's
``--model attnsurgery --model_args ...,recipe=runs/x`` load it; ``handle.remove()`` restores the model exactly.

accelerate handles devices, mixed precision and processes: ``accelerate launch -m attnsurgery train ...`` (DDP;
on CPU ``ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 -m attnsurgery train ...``). ``batch_size`` is the
*global* batch per optimiser step, split over processes and accumulation steps, and every process draws the
same seeded order, so N processes follow the 1-process loss curve.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..engine import Engine
from ..surgery import Stage, Surgery
from .config import TrainConfig, TrainingDiverged, TrainingError, TrainingInterrupted, TrainResult
from .data import TrainingData
from .heap import keep_freed_memory
from .objectives import TERMS, StepOutputs, parse_objective
from .outlier import OutlierReader
from .runfolder import CHECKPOINT, _atomic_save, _diff, _fingerprint, _warm_start, check_run_folder, write_run
from .sink import FIRST_SINK_LAYER, SinkProbe, attach_probe

# ----------------------------------------------------------------------------------------------------------
# The module accelerate wraps: the model plus its surgeries, computing the whole objective in forward (so DDP
# sees every parameter that receives a gradient)
# ----------------------------------------------------------------------------------------------------------


def load_trainable_state(model: nn.Module, surgeries: list[Surgery], state: dict[str, torch.Tensor]) -> None:
    """Load a checkpoint's ``state`` (keys ``"{i}.{name}"``: surgery ``i``'s own state entry) into ``surgeries``."""
    with torch.no_grad():
        for i, s in enumerate(surgeries):
            s.load_state_dict({k[len(f"{i}.") :]: v for k, v in state.items() if k.startswith(f"{i}.")})
    Engine.of(model).refresh()


def _allow_precision(mixed_precision: str) -> None:
    """Let this process's next Accelerator take ``mixed_precision``.

    accelerate keeps one process-wide state and refuses an Accelerator whose mixed precision differs from the first
    one's ("restart your runtime"); one process here trains several runs (a budget table whose arms train in
    different precisions, a test suite). The precision part of that state is dropped so the next Accelerator sets
    it afresh; the process-group part (devices, ranks of a distributed launch) is kept."""
    from accelerate.state import AcceleratorState

    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") not in (None, mixed_precision):
        AcceleratorState._reset_state(reset_partial_state=False)


class _Trainee(nn.Module):
    def __init__(self, model: nn.Module, surgeries: list[Surgery], weights: dict[str, float], kd_t: float):
        super().__init__()
        self.model = model
        self.surgeries = nn.ModuleList(surgeries)
        self.weights = weights
        self.kd_t = kd_t
        engine = Engine.of(model, create=False)
        if engine is None:
            raise TrainingError("train: the model carries no surgery to train; patch it first.")
        self._engine = [engine]  # a list: not a submodule
        acting = {i for i in range(engine.info.num_layers) for s in surgeries if s.active_stages(i)}
        self.transfer_layers = sorted(acting) or list(range(engine.info.num_layers))
        if "sink" in weights and engine.info.num_layers <= FIRST_SINK_LAYER:
            raise TrainingError(
                f"train: the 'sink' objective averages layers >= {FIRST_SINK_LAYER}; this model has "
                f"{engine.info.num_layers} layers."
            )
        self._probe: list[SinkProbe | None] = [None]  # a list: not a submodule

    def open(self) -> None:
        """Attach the ``sink`` term's reader for the run (close() removes it; it is not part of the result)."""
        if "sink" in self.weights and self._probe[0] is None:
            self._probe[0] = attach_probe(self.model, self._engine[0])

    def close(self) -> None:
        probe, self._probe = self._probe[0], [None]
        if probe is not None:
            self._engine[0].remove(probe)

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        engine, w = self._engine[0], self.weights
        terms = [TERMS[k] for k in w]
        out = StepOutputs(kd_temperature=self.kd_t)
        records: dict[int, tuple[tuple, dict, torch.Tensor]] = {}
        want_attention = any(t.teacher_attention for t in terms)
        if want_attention or any(t.teacher_logits for t in terms):  # one teacher pass serves every term
            with (
                torch.no_grad(),
                engine.disabled(),
                _record_attention(engine, self.transfer_layers, want_attention) as records,
            ):
                out.teacher_logits = self.model(input_ids=input_ids, use_cache=False).logits
        if any(t.student for t in terms):  # one student pass serves every term
            reader = OutlierReader(engine.info.layers) if "outlier" in w else contextlib.nullcontext()
            with reader:
                labels = input_ids if any(t.labels for t in terms) else None
                out.student = self.model(input_ids=input_ids, labels=labels, use_cache=False)
            out.crest = reader.take() if "outlier" in w else None
            out.sink_share = self._probe[0].take() if "sink" in w else None

        def transfer() -> torch.Tensor:  # each acting layer fed the teacher's inputs, against its output
            mse = []
            for idx in self.transfer_layers:
                args, kwargs, target = records[idx]
                got = engine.info.attention[idx](*args, **kwargs)[0]
                mse.append(F.mse_loss(got.float(), target.float()))
            return torch.stack(mse).mean()

        out.transfer = transfer
        parts = {t.name: t.compute(out) for t in terms}
        total = sum(w[k] * v for k, v in parts.items())
        reg = [r for s in self.surgeries if (r := s.regularizer()) is not None]
        if reg:
            parts["regularizer"] = sum(reg)
            total = total + parts["regularizer"]
        return total, parts


class _record_attention:
    """Record each listed attention module's inputs and output during the teacher pass (for ``transfer``)."""

    def __init__(self, engine: Engine, layers: list[int], active: bool) -> None:
        self.engine, self.layers, self.active = engine, layers, active
        self.records: dict[int, tuple[tuple, dict, torch.Tensor]] = {}
        self.handles: list[Any] = []

    def __enter__(self) -> dict[int, tuple[tuple, dict, torch.Tensor]]:
        if not self.active:
            return self.records
        for idx in self.layers:
            module = self.engine.info.attention[idx]

            def hook(mod: nn.Module, args: tuple, kwargs: dict, output: Any, idx: int = idx) -> None:
                self.records[idx] = (args, dict(kwargs), output[0].detach())

            self.handles.append(module.register_forward_hook(hook, with_kwargs=True))
        return self.records

    def __exit__(self, *exc: Any) -> None:
        for h in self.handles:
            h.remove()


# ----------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------


def _batch_indices(step: int, n: int, batch: int, seed: int) -> torch.Tensor:
    """The global batch of optimiser step ``step`` (0-based): consecutive slices of seeded per-epoch
    permutations, a pure function of the step so a resumed run and every process draw the same windows."""
    start = step * batch
    out = []
    while len(out) < batch:
        epoch, offset = divmod(start + len(out), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out += perm[offset : offset + batch - len(out)].tolist()
    return torch.tensor(out)


def _lr_factor(step: int, config: TrainConfig) -> float:
    """The learning rate of optimiser step ``step`` (0-based) relative to the configured one: a pure function of the
    step (resumed runs and every process agree). A linear warm-up over the first ``warmup`` fraction of the steps,
    then constant, or a cosine / linear decay reaching 0 at step ``steps`` (as transformers' ``get_scheduler``)."""
    warm = int(config.warmup * config.steps)
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, config.steps - warm)
    if config.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if config.schedule == "linear":
        return 1.0 - progress
    return 1.0


def train(
    model: nn.Module,
    handle: Any,
    data: TrainingData,
    config: TrainConfig | None = None,
    *,
    out_dir: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    model_name: str | None = None,
    progress: bool = True,
    after_step: Callable[[list[Surgery]], None] | None = None,
    warm_start: str | Path | None = None,
    label: str | None = None,
) -> TrainResult:
    """Train the surgeries of ``handle`` (a :class:`SurgeryHandle` on ``model``) on ``data``.

    Writes ``out_dir`` (see the module docstring) when given. ``after_step(surgeries)`` runs under ``no_grad``
    after every optimiser step (e.g. a projection onto a constraint set). ``label`` names the run on its progress
    bar and validation lines (e.g. "stage 1, transfer" when one command trains several stages).

    ``warm_start``: a finished run folder of this same run whose checkpoint is gone (a fresh clone holds committed
    states, not optimisers). The run continues from its step, history and data order; the surgeries must already
    hold its state (``patch(model, folder)``). Only the optimiser's moments start afresh, so the continuation is
    not bit-identical to an uninterrupted run (with a constant learning rate, Adam's moments refill in a few dozen
    steps).
    """
    run = _Run(model, handle, data, config or TrainConfig(), out_dir, resume=resume, overwrite=overwrite)
    run.restore(resume, warm_start)
    run.loop(progress, after_step, label)
    return run.finish(model_name)


class _Run:
    """One call of :func:`train`, in four parts: setup (``__init__``: checks, optimiser), :meth:`restore` (a
    checkpoint or a warm start), :meth:`loop` (the steps, validations and checkpoints) and :meth:`finish` (the
    kept state, the result and the run folder)."""

    def __init__(
        self,
        model: nn.Module,
        handle: Any,
        data: TrainingData,
        config: TrainConfig,
        out_dir: str | Path | None,
        *,
        resume: bool,
        overwrite: bool,
    ) -> None:
        from accelerate import Accelerator

        config.validate()
        weights = parse_objective(config.objective)
        self.model, self.handle, self.data, self.config = model, handle, data, config
        self.surgeries = surgeries = list(handle.surgeries)
        self.params = params = [p for s in surgeries for p in s.parameters() if p.requires_grad]
        if not params:
            raise TrainingError(
                f"train: {', '.join(s.name for s in surgeries)} hold no trainable parameters. Train a surgery "
                "with parameters (gated_attention, head_scale trainable=true, temperature trainable=true ...) or "
                "add LoRA (--lora-r)."
            )
        self.out = out = Path(out_dir) if out_dir is not None else None
        if out is not None:
            check_run_folder(out, resume=resume, overwrite=overwrite)
        elif resume:
            raise TrainingError("train: resume=True needs out_dir, the folder of the run to continue.")

        _allow_precision(config.mixed_precision)
        self.accelerator = accelerator = Accelerator(
            mixed_precision=config.mixed_precision, cpu=not torch.cuda.is_available()
        )
        self.world = accelerator.num_processes
        self.per_micro, rest = divmod(config.batch_size, self.world * config.grad_accum)
        if rest or self.per_micro == 0:
            raise TrainingError(
                f"train: batch_size {config.batch_size} must be a multiple of processes x grad_accum "
                f"({self.world} x {config.grad_accum})."
            )
        self.fingerprint = _fingerprint(model, surgeries, config, data)
        if out is not None and overwrite and not resume and out.exists() and accelerator.is_main_process:
            shutil.rmtree(out)
        if out is not None and accelerator.is_main_process:
            out.mkdir(parents=True, exist_ok=True)

        # surgeries that change the model's own weights (LoRA adapters, finetune's copies) train at lora_lr;
        # surgery parameters (gates, temperatures, routers, feature maps) at lr
        surgery_params = {id(p) for s in surgeries if Stage.WEIGHTS not in s.stages for p in s.parameters()}
        groups = [
            {"params": [p for p in params if id(p) in surgery_params], "lr": config.lr},
            {"params": [p for p in params if id(p) not in surgery_params], "lr": config.lora_lr},
        ]
        groups = [g for g in groups if g["params"]]
        for g in groups:
            g["initial_lr"] = g["lr"]
        self.trainee = _Trainee(model, surgeries, weights, config.kd_temperature)
        self.optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)

        self.history: list[float] = []
        self.step_seconds: list[float] = []  # per step: their median is the rate, whatever paused the run
        self.parts_hist: dict[str, list[float]] = {}
        self.val_history: list[dict[str, float]] = []
        self.best: tuple[float, int, dict[str, torch.Tensor] | None] = (
            math.inf,
            0,
            None,
        )  # objective, step, state
        self.start_step, self.elapsed = 0, 0.0
        self.saved: list[int] = []  # the step of the checkpoint on disk, if any
        self.started = time.perf_counter()

    # -- state ----------------------------------------------------------------------------------------------------
    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {
            f"{i}.{k}": v.detach().clone()
            for i, s in enumerate(self.surgeries)
            for k, v in s.state_dict().items()
        }

    def load_trainable(self, state: dict[str, torch.Tensor]) -> None:
        load_trainable_state(self.model, self.surgeries, state)

    def restore(self, resume: bool, warm_start: str | Path | None) -> None:
        """Continue from the run folder's checkpoint (``resume``) or a finished run's committed state."""
        out, config = self.out, self.config
        if resume:
            ckpt = torch.load(out / CHECKPOINT, map_location="cpu", weights_only=False)
            problems = _diff(ckpt["fingerprint"], self.fingerprint)
            if problems:
                raise TrainingError(
                    f"{out}/{CHECKPOINT} was made by another run, so it cannot be resumed here: "
                    + "; ".join(problems[:4])
                    + ". Use the same settings, or --overwrite to start afresh."
                )
            self.load_trainable(ckpt["state"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.start_step, self.history, self.val_history = (
                ckpt["step"],
                ckpt["history"],
                ckpt["val_history"],
            )
            self.parts_hist, self.elapsed = ckpt["parts"], ckpt["seconds"]
            self.step_seconds = list(ckpt.get("step_seconds", []))  # older checkpoints kept none
            self.best = (ckpt["best"][0], ckpt["best"][1], ckpt["best_state"])
            self.saved = [self.start_step]
        elif warm_start is not None:
            (
                self.start_step,
                self.history,
                self.parts_hist,
                self.val_history,
                self.elapsed,
                self.step_seconds,
            ) = _warm_start(Path(warm_start), config, self.data)
            if self.start_step > config.steps:
                raise TrainingError(
                    f"warm_start {warm_start} is at step {self.start_step}, past steps={config.steps}."
                )
            if self.val_history:
                last = self.val_history[-1]
                self.best = (last["objective"], last["step"], self.trainable_state())

    def save_checkpoint(self, step: int) -> None:
        if self.out is None or not self.accelerator.is_main_process:
            return
        self.saved[:] = [step]
        _atomic_save(
            {
                "fingerprint": self.fingerprint,
                "step": step,
                "state": self.trainable_state(),
                "optimizer": self.optimizer.state_dict(),
                "history": self.history,
                "parts": self.parts_hist,
                "step_seconds": self.step_seconds,
                "val_history": self.val_history,
                "best": self.best[:2],
                "best_state": self.best[2],
                "seconds": self.elapsed + time.perf_counter() - self.started,
            },
            self.out / CHECKPOINT,
        )

    @torch.no_grad()
    def validate(self, step: int) -> dict[str, float]:
        sums: dict[str, float] = {}
        n = 0
        model, accelerator = self.model, self.accelerator
        for s in range(0, len(self.data.val), self.per_micro):
            ids = self.data.val[s : s + self.per_micro].to(accelerator.device)
            with accelerator.autocast():
                total, parts = self.trainee(ids)
                lm = parts["lm"] if "lm" in parts else model(input_ids=ids, labels=ids, use_cache=False).loss
            k = ids.shape[0]
            sums["objective"] = sums.get("objective", 0.0) + float(total) * k
            sums["lm"] = sums.get("lm", 0.0) + float(lm) * k
            for term in ("sink", "outlier"):
                if term in parts:
                    sums[term] = sums.get(term, 0.0) + float(parts[term]) * k
            n += k
        row = {"step": step, **{k: v / n for k, v in sums.items()}}
        row["ppl"] = math.exp(min(row["lm"], 50.0))
        return row

    # -- the loop -------------------------------------------------------------------------------------------------
    def loop(
        self, progress: bool, after_step: Callable[[list[Surgery]], None] | None, label: str | None = None
    ) -> None:
        """Train from the restored step to ``config.steps``; the model's flags are restored however it ends, and an
        interrupt saves a checkpoint first."""
        model = self.model
        frozen = [(p, p.requires_grad) for p in model.parameters()]
        trainable_ids = {id(p) for p in self.params}
        was_training = model.training
        self.started = time.perf_counter()
        try:
            self.trainee.open()
            for p in model.parameters():
                p.requires_grad_(id(p) in trainable_ids)
            # eval mode: no dropout, so the loss the surgery parameters see is the one inference sees, the teacher
            # and student passes differ only by the surgeries, and N processes follow the 1-process curve
            model.eval()
            # each step's large tensors reuse the last step's pages instead of fresh mmaps (glibc; see .heap)
            with keep_freed_memory():
                self._steps(progress, after_step, label)
        except KeyboardInterrupt:
            done = len(self.history)
            self.save_checkpoint(done)
            raise TrainingInterrupted(
                f"interrupted after {done} steps; a checkpoint is in {self.out}. Continue with --resume."
                if self.out is not None
                else f"interrupted after {done} steps (no --out, nothing saved)."
            ) from None
        finally:
            self.trainee.close()
            for p, flag in frozen:
                p.requires_grad_(flag)
            model.train(was_training)

    def _steps(
        self, progress: bool, after_step: Callable[[list[Surgery]], None] | None, label: str | None
    ) -> None:
        from tqdm import tqdm

        config, data, accelerator, world = self.config, self.data, self.accelerator, self.world
        wrapped, optimizer = accelerator.prepare(self.trainee, self.optimizer)
        self.optimizer = optimizer
        if not self.val_history:
            self.val_history.append(self.validate(0))
            self.best = (self.val_history[0]["objective"], 0, self.trainable_state())
        bar = tqdm(
            total=config.steps,
            initial=self.start_step,
            disable=not (progress and accelerator.is_main_process),
            desc=label or "train",
            unit="step",
        )
        tokens_per_step = config.batch_size * data.train.shape[1]
        stale, step = 0, self.start_step
        while step < config.steps:
            t_step = time.perf_counter()  # the step alone: validation and checkpoints are timed apart
            idx = _batch_indices(step, len(data.train), config.batch_size, config.seed)
            mine = idx.view(world, config.grad_accum, self.per_micro)[accelerator.process_index]
            step_parts: dict[str, float] = {}
            step_loss = 0.0
            for g in optimizer.param_groups:
                g["lr"] = g["initial_lr"] * _lr_factor(step, config)
            for micro in range(config.grad_accum):
                ids = data.train[mine[micro]].to(accelerator.device)
                sync = micro == config.grad_accum - 1
                ctx = accelerator.no_sync(wrapped) if not sync and world > 1 else contextlib.nullcontext()
                with ctx, accelerator.autocast():
                    total, parts = wrapped(ids)
                    accelerator.backward(total / config.grad_accum)
                step_loss += float(total.detach()) / config.grad_accum
                for k, v in parts.items():
                    step_parts[k] = step_parts.get(k, 0.0) + float(v.detach()) / config.grad_accum
            loss_t = accelerator.reduce(
                torch.tensor([step_loss], device=accelerator.device), reduction="mean"
            )
            loss_value = float(loss_t)
            if not math.isfinite(loss_value):
                optimizer.zero_grad(set_to_none=True)
                where = (
                    f"the last good checkpoint (step {self.saved[0]}) is kept in {self.out / CHECKPOINT}"
                    if self.saved
                    else "no checkpoint was written yet"
                )
                raise TrainingDiverged(
                    f"train: the loss became {loss_value} at step {step + 1}; stopped without applying that step, "
                    f"{where}. Lower --lr (now {config.lr}) or --lora-lr, or use --mixed-precision no."
                )
            if config.max_grad_norm is not None:
                accelerator.clip_grad_norm_(self.params, config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if after_step is not None:
                with torch.no_grad():
                    after_step(self.surgeries)
            step += 1
            self.history.append(loss_value)
            for k, v in step_parts.items():
                self.parts_hist.setdefault(k, []).append(v)
            took = time.perf_counter() - t_step
            self.step_seconds.append(round(took, 4))
            bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{tokens_per_step / max(took, 1e-9):.0f}")
            bar.update(1)
            if step % config.val_every == 0 or step == config.steps:
                row = self.validate(step)
                self.val_history.append(row)
                if row["objective"] < self.best[0]:
                    self.best, stale = (row["objective"], step, self.trainable_state()), 0
                else:
                    stale += 1
                if not bar.disable:  # progress=False: nothing written
                    bar.write(
                        f"{label + ', ' if label else ''}step {step}: validation objective "
                        f"{row['objective']:.5f}, lm {row['lm']:.5f}"
                    )
                if config.patience is not None and stale >= config.patience:
                    if not bar.disable:
                        bar.write(f"no improvement in {stale} validations: stopping early")
                    self.save_checkpoint(step)
                    break
            if step % config.save_every == 0 or step == config.steps:
                self.save_checkpoint(step)
        bar.close()

    # -- the end --------------------------------------------------------------------------------------------------
    def finish(self, model_name: str | None) -> TrainResult:
        config = self.config
        if config.keep == "best" and self.best[2] is not None:
            self.load_trainable(self.best[2])
        result = TrainResult(
            out_dir=self.out,
            steps=len(self.history),
            train_loss=self.history,
            val_history=self.val_history,
            best_step=self.best[1],
            seconds=self.elapsed + time.perf_counter() - self.started,
            tokens=len(self.history) * config.batch_size * int(self.data.train.shape[1]),
            parts=self.parts_hist,
            step_seconds=self.step_seconds,
        )
        if self.out is not None and self.accelerator.is_main_process:
            write_run(self.out, self.model, self.handle, result, config, self.data, model_name)
        self.accelerator.wait_for_everyone()
        return result
