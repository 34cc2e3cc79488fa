"""The shared trainer: what trains, objectives, the output folder as a recipe, resume, interrupts, data rules,
and N processes == 1 process. Tiny random-weight models, a few steps each."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tiny import NOISE_FACTOR, float_noise, logit_atol, random_ids, tiny_model, tiny_tokenizer

from attnsurgery import patch
from attnsurgery.api import SurgeryHandle
from attnsurgery.engine import Engine
from attnsurgery.train import (
    DataError,
    ObjectiveError,
    TrainConfig,
    TrainingDiverged,
    TrainingError,
    TrainingInterrupted,
    load_texts,
    parse_objective,
    prepare_data,
    train,
)

SEQ = 32


@pytest.fixture(scope="module")
def data():
    return prepare_data(tiny_tokenizer(), "gutenberg_ppl", SEQ, max_val_windows=4)


def cfg(**kw):
    base = dict(steps=4, batch_size=2, seq_len=SEQ, lr=0.05, lora_lr=0.01, val_every=2, save_every=1)
    return TrainConfig(**{**base, **kw})


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def scale_and_lora(model):
    a = patch(model, "head_scale", trainable=True)
    b = patch(model, "lora", r=2, targets="q_proj,v_proj")
    return SurgeryHandle(model, a.surgeries + b.surgeries)


def test_only_surgery_parameters_train_and_the_run_folder_is_a_recipe(data, tmp_path):
    model = tiny_model("llama")
    base = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    handle = scale_and_lora(model)
    result = train(model, handle, data, cfg(), out_dir=tmp_path / "run", progress=False)
    assert result.steps == 4 and len(result.val_history) == 3
    # base weights untouched (the LoRA-wrapped ones included), flags restored; the surgeries did move
    for name, value in model.state_dict().items():
        key = name.replace(".base_layer", "")
        if key in base:
            assert torch.equal(value, base[key]), name
    now = {
        n.replace(".base_layer", ""): p.requires_grad for n, p in model.named_parameters() if "lora_" not in n
    }
    assert now == flags
    assert not torch.equal(handle.surgeries[0].scale, torch.ones_like(handle.surgeries[0].scale))
    ids = random_ids(2, 12)
    trained = logits(model, ids)
    handle.remove()
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items())
    # the folder: recipe + states + peft adapter + history; patch(model, folder) reproduces the trained model
    run = tmp_path / "run"
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    assert [s["surgery"] for s in recipe["surgeries"]] == ["head_scale", "lora"]
    assert recipe["training"]["steps"] == 4 and recipe["training"]["data"]["source"] == "gutenberg_ppl"
    assert (run / "adapter" / "adapter_config.json").is_file()
    fresh = tiny_model("llama")
    with patch(fresh, str(run)):  # exact: the same float32 states through the same ops
        torch.testing.assert_close(logits(fresh, ids), trained, atol=0, rtol=0)
    assert torch.equal(logits(fresh, ids), logits(tiny_model("llama"), ids))


def test_kd_teacher_is_the_unpatched_model(data):
    from attnsurgery.train.trainer import _Trainee

    model = tiny_model("llama")
    model64 = copy.deepcopy(model).double()  # the same computation in float64, for the noise scale below
    ids = data.train[:2]
    with torch.no_grad():
        plain = torch.log_softmax(model(ids).logits[:, :-1], -1)
    handle = patch(model, "head_scale", trainable=True)
    trainee = _Trainee(model, handle.surgeries, {"kd": 1.0}, 1.0)
    with torch.no_grad():
        at_identity, _ = trainee(ids)
        handle.surgeries[0].scale.mul_(0.5)
        total, _ = trainee(ids)
        student = torch.log_softmax(model(ids).logits[:, :-1], -1)
    # exact: head_scale multiplies the stock kernel's output by exactly 1, and kd_loss is exactly 0 on equal logits
    assert float(at_identity) == 0.0
    want = (plain.exp() * (plain - student)).sum(-1).mean()
    # the reference's float noise on this machine: the same KL on the float64 copy, its heads halved the same way
    with torch.no_grad():
        plain64 = torch.log_softmax(model64(ids).logits[:, :-1], -1)
        with patch(model64, "head_scale", scale=0.5):
            student64 = torch.log_softmax(model64(ids).logits[:, :-1], -1)
    want64 = (plain64.exp() * (plain64 - student64)).sum(-1).mean()
    torch.testing.assert_close(total, want, atol=NOISE_FACTOR * float_noise(want, want64), rtol=0)


def test_transfer_matches_per_layer_mse_on_teacher_inputs(data):
    from attnsurgery.train.trainer import _Trainee

    ids = data.train[:2]

    def halved_mse(model):
        """The MSE that halving every head of layers 1-2 makes, from the stock attention outputs."""
        outs, hook_handles = {}, []
        for i, m in enumerate(Engine.of(model).info.attention):
            hook_handles.append(
                m.register_forward_hook(lambda mod, a, o, i=i: outs.__setitem__(i, o[0].detach()))
            )
        with torch.no_grad():
            model(ids)
        for h in hook_handles:
            h.remove()
        # o_proj is linear: scaling every head by 0.5 halves the attention output (minus the bias: none in Llama)
        return torch.stack([((outs[i] * 0.5 - outs[i]) ** 2).mean() for i in (1, 2)]).mean()

    model = tiny_model("llama")
    # the reference's float noise on this machine: the same MSE from a float64 copy of the model
    want64 = halved_mse(copy.deepcopy(model).double())
    want = halved_mse(model)
    handle = patch(model, "head_scale", trainable=True, layers="1:")
    with torch.no_grad():
        handle.surgeries[0].scale.mul_(0.5)
    trainee = _Trainee(model, handle.surgeries, {"transfer": 1.0}, 1.0)
    assert trainee.transfer_layers == [1, 2]
    with torch.no_grad():
        total, _ = trainee(ids)
    torch.testing.assert_close(total, want, atol=NOISE_FACTOR * float_noise(want, want64), rtol=0)


def test_resume_continues_exactly(data, tmp_path):
    full_model = tiny_model("llama")
    full = scale_and_lora(full_model)
    train(full_model, full, data, cfg(), out_dir=tmp_path / "a", progress=False)
    model = tiny_model("llama")
    handle = scale_and_lora(model)
    train(model, handle, data, cfg(steps=2), out_dir=tmp_path / "b", progress=False)
    handle.remove()
    model = tiny_model("llama")
    handle = scale_and_lora(model)
    result = train(model, handle, data, cfg(), out_dir=tmp_path / "b", resume=True, progress=False)
    assert result.steps == 4
    # one time per step across the resume (the rate of a run trained over sessions is its median step)
    assert len(result.step_seconds) == 4 and all(t > 0 for t in result.step_seconds)
    saved = json.loads((tmp_path / "b" / "training.json").read_text())["step_seconds"]
    assert saved == result.step_seconds
    recipe = yaml.safe_load((tmp_path / "b" / "recipe.yaml").read_text())["training"]
    assert recipe["median_step_seconds"] == pytest.approx(statistics.median(saved), abs=1e-3)
    for a, b in zip(full.surgeries, handle.surgeries):
        for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
            # exact: the checkpoint holds the float32 states, optimiser moments and data position as they were,
            # and the resumed steps run the same ops on the same shapes in this process
            torch.testing.assert_close(x, y, atol=0, rtol=0, msg=k)


def test_a_run_repeats_whatever_the_global_random_state(data, tmp_path):
    """Two runs of one config end at the same state, bit for bit, even when torch's global generator differs
    between them (it used to seed peft's LoRA A: identical budget runs ended 0.7 points of perplexity apart)."""
    states = []
    for seed, out in ((1, "a"), (2, "b")):
        model = tiny_model("llama")
        torch.manual_seed(seed)  # what the caller did before patching: nothing the run should depend on
        handle = scale_and_lora(model)
        train(model, handle, data, cfg(steps=2), out_dir=tmp_path / out, progress=False)
        states.append([dict(s.state_dict()) for s in handle.surgeries])
        handle.remove()
    for a, b in zip(*states):
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=0, rtol=0, msg=k)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_lr_schedule_matches_transformers_after_the_warmup(schedule):
    """The decays are transformers' (get_scheduler, the reference) once the warm-up is over; the warm-up is linear
    from 1/warm (step 0 already trains, unlike transformers' 0); constant stays 1."""
    from transformers import get_scheduler

    from attnsurgery.train.trainer import _lr_factor

    config = TrainConfig(steps=20, warmup=0.2, schedule=schedule)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    reference = get_scheduler(schedule, optimizer, num_warmup_steps=4, num_training_steps=20)
    want = []
    for _ in range(20):
        want.append(reference.get_last_lr()[0])
        optimizer.step()
        reference.step()
    got = [_lr_factor(step, config) for step in range(20)]
    assert got[:4] == [0.25, 0.5, 0.75, 1.0]
    # literal: float64 vs float64 (Python floats, the same formula in another order), not a float32 comparison
    assert got[4:] == pytest.approx(want[4:], abs=1e-12)
    assert got[4] == 1.0 and 0 < got[-1] < got[10] < 1  # decays, still above 0 at the last step
    assert [_lr_factor(s, TrainConfig(steps=20)) for s in range(20)] == [1.0] * 20
    with pytest.raises(TrainingError, match="schedule='cosinus' is not one of"):
        TrainConfig(schedule="cosinus").validate()


def test_lr_schedule_reaches_the_optimizer_and_binds_resume_to_steps(data, tmp_path, monkeypatch):
    """Every optimiser step runs at its scheduled rate (both parameter groups); a decaying run's checkpoint is
    refused for another number of steps (the decay would change), a constant-rate run may be continued further."""
    seen = []
    real_step = torch.optim.AdamW.step

    def spy(self, *args, **kwargs):
        seen.append([g["lr"] for g in self.param_groups])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    model = tiny_model("llama")
    train(model, scale_and_lora(model), data, cfg(schedule="linear"), out_dir=tmp_path / "r", progress=False)
    assert seen == [[0.05 * f, 0.01 * f] for f in (1.0, 0.75, 0.5, 0.25)]
    monkeypatch.undo()
    model = tiny_model("llama")
    with pytest.raises(TrainingError, match="steps: checkpoint 4, this run 6"):
        train(
            model,
            scale_and_lora(model),
            data,
            cfg(schedule="linear", steps=6),
            out_dir=tmp_path / "r",
            resume=True,
            progress=False,
        )


def test_resume_refuses_another_run(data, tmp_path):
    model = tiny_model("llama")
    train(
        model,
        patch(model, "head_scale", trainable=True),
        data,
        cfg(steps=1),
        out_dir=tmp_path / "r",
        progress=False,
    )
    other = tiny_model("llama")
    with pytest.raises(TrainingError, match="another run.*lr: checkpoint 0.05, this run 0.1"):
        train(
            other,
            patch(other, "head_scale", trainable=True),
            data,
            cfg(lr=0.1),
            out_dir=tmp_path / "r",
            resume=True,
        )


def test_existing_folder_refused_and_nothing_written(data, tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "mine.txt").write_text("keep me")
    model = tiny_model("llama")
    handle = patch(model, "head_scale", trainable=True)
    with pytest.raises(TrainingError, match="--resume.*--overwrite"):
        train(model, handle, data, cfg(), out_dir=tmp_path / "r")
    assert os.listdir(tmp_path / "r") == ["mine.txt"]
    with pytest.raises(TrainingError, match="hold no trainable parameters"):
        train(model, patch(model, "temperature", tau=0.9), data, cfg(), out_dir=tmp_path / "new")
    assert not (tmp_path / "new").exists()


def _fail_at(surgery, step, exc):
    calls = {"n": 0}

    def regularizer():
        calls["n"] += 1
        if calls["n"] == 1 + step:  # the first call is the step-0 validation pass (one batch here)
            if exc == "nan":
                return torch.tensor(float("nan"))
            raise KeyboardInterrupt
        return None

    surgery.regularizer = regularizer


def test_nan_stops_and_keeps_the_last_good_checkpoint(data, tmp_path):
    model = tiny_model("llama")
    handle = patch(model, "head_scale", trainable=True)
    data_small = type(data)(data.train, data.val[:2], data.source, data.n_texts, data.n_val_texts)
    _fail_at(handle.surgeries[0], 3, "nan")
    with pytest.raises(TrainingDiverged, match=r"nan at step 3.*last good checkpoint \(step 2\)"):
        train(model, handle, data_small, cfg(val_every=100), out_dir=tmp_path / "r", progress=False)
    ckpt = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=False)
    assert ckpt["step"] == 2 and torch.isfinite(ckpt["state"]["0.scale"]).all()
    assert not (tmp_path / "r" / "recipe.yaml").exists()


def test_ctrl_c_saves_and_resume_finishes(data, tmp_path):
    model = tiny_model("llama")
    handle = patch(model, "head_scale", trainable=True)
    data_small = type(data)(data.train, data.val[:2], data.source, data.n_texts, data.n_val_texts)
    _fail_at(handle.surgeries[0], 3, "interrupt")
    with pytest.raises(TrainingInterrupted, match="after 2 steps.*--resume") as err:
        train(model, handle, data_small, cfg(val_every=100), out_dir=tmp_path / "r", progress=False)
    assert err.value.exit_code == 130
    from attnsurgery.errors import RecipeError

    with pytest.raises(RecipeError, match="did not finish.*--resume"):
        patch(tiny_model("llama"), str(tmp_path / "r"))
    model = tiny_model("llama")
    handle = patch(model, "head_scale", trainable=True)
    result = train(
        model, handle, data_small, cfg(val_every=100), out_dir=tmp_path / "r", resume=True, progress=False
    )
    assert result.steps == 4 and (tmp_path / "r" / "recipe.yaml").is_file()


def test_objective_parsing():
    assert parse_objective("0.5*lm+kd") == {"lm": 0.5, "kd": 1.0}
    assert parse_objective("1000*transfer") == {"transfer": 1000.0}
    with pytest.raises(ObjectiveError, match="'transfr'.*Did you mean 'transfer'"):
        parse_objective("lm+transfr")
    with pytest.raises(ObjectiveError, match="cannot parse"):
        parse_objective("lm*2")


def test_data_rules(tmp_path):
    from attnsurgery.tasks import load_split

    with pytest.raises(DataError, match="test.*tables report"):
        load_texts("gutenberg_ppl:test")
    from attnsurgery.tasks import include_path

    with pytest.raises(DataError, match="test split"):
        load_texts(str(Path(include_path()) / "data" / "gutenberg_ppl.test.jsonl"))
    with pytest.raises(DataError, match="Did you mean 'gutenberg_ppl'"):
        load_texts("gutenberg_pl")
    (tmp_path / "empty.jsonl").write_text('{"text": "  "}\n')
    with pytest.raises(DataError, match="no non-empty text"):
        load_texts(str(tmp_path / "empty.jsonl"))
    (tmp_path / "doc.txt").write_text("first paragraph here.\n\nsecond one.\n")
    assert len(load_texts(str(tmp_path / "doc.txt"))) == 2
    with pytest.raises(DataError, match="longer than the model's context"):
        prepare_data(tiny_tokenizer(), "gutenberg_ppl", 512, max_context=256)
    # the calibration split shares no text with the test split that tables report
    train_texts = set(load_texts("gutenberg_ppl"))
    assert not train_texts & {r["text"] for r in load_split("gutenberg_ppl", "test")}
    mc = load_texts("bb_general_knowledge")
    assert mc[0].startswith("\nQ:") and len(mc) == len(load_split("bb_general_knowledge", "calibration"))


def test_two_processes_follow_the_one_process_curve(tmp_path):
    """Same global batch on 1 and 2 CPU processes (gloo DDP through accelerate): the same loss curve and the same
    trained parameters, to NOISE_FACTOR x the run's float noise (the same training on a float64 copy)."""
    env = {
        **os.environ,
        "ACCELERATE_USE_CPU": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(Path(__file__).parent),
    }
    curves = {}
    for n in (1, 2):
        out = tmp_path / f"{n}.json"
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(n),
            "--master_port",
            str(29500 + n),
            str(Path(__file__).parent / "_ddp_train.py"),
            str(out),
        ]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        curves[n] = json.loads(out.read_text())
    assert curves[1]["world"] == 1 and curves[2]["world"] == 2  # really data parallel

    # the run's float noise on this machine: _ddp_train.py's training in this process, float32 against a float64
    # copy of the model (the head scales stay float32 parameters; transformers computes the loss in float32, so a
    # loss is known to its float32 resolution at best: float_noise's floor)
    def one_process(model):
        handle = patch(model, "head_scale", trainable=True)
        config = TrainConfig(
            steps=4, batch_size=4, seq_len=32, lr=0.05, objective="lm+kd", val_every=2, save_every=100
        )
        result = train(
            model, handle, prepare_data(tiny_tokenizer(), "gutenberg_ppl", 32), config, progress=False
        )
        return result.train_loss, handle.surgeries[0].scale.detach().clone()

    (loss32, scale32), (loss64, scale64) = (
        one_process(tiny_model("llama")),
        one_process(tiny_model("llama").double()),
    )
    for key, noise in (("loss", float_noise(loss32, loss64)), ("scale", float_noise(scale32, scale64))):
        torch.testing.assert_close(
            torch.tensor(curves[2][key]),
            torch.tensor(curves[1][key]),
            atol=NOISE_FACTOR * noise,
            rtol=0,
            msg=key,
        )
    assert curves[1]["loss"][0] != curves[1]["loss"][-1]


def test_training_table_trains_scores_and_reuses(tmp_path, monkeypatch):
    """kind: training tables through `attnsurgery reproduce`: each arm trains on the calibration split, is scored
    on the test split (FP / W8A8 perplexity, outliers), and a re-run reuses finished arms without measuring them
    again (their outlier statistics are kept for the plot)."""
    import attnsurgery.eval.training_table as training_table
    from attnsurgery.cli import main

    model_dir = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    table = tmp_path / "t.yaml"
    table.write_text(
        yaml.safe_dump(
            {
                "name": "t",
                "kind": "training",
                "models": [str(model_dir)],
                "seq_len": SEQ,
                "eval": {"test_windows": 2, "calib_windows": 2, "outlier_windows": 1},
                "arms": [
                    {"name": "baseline"},
                    {
                        "name": "gates",
                        "surgeries": [{"surgery": "gated_attention", "args": {"form": "headwise"}}],
                        "train": {"steps": 2, "batch_size": 2, "lr": 0.05, "val_every": 2, "lora": {"r": 2}},
                    },
                ],
            }
        )
    )
    out = tmp_path / "out"
    assert main(["reproduce", str(table), "--out", str(out)]) == 0
    rows = json.loads((out / "table.json").read_text())["rows"]
    assert [r["arm"] for r in rows] == ["baseline", "gates"]
    assert rows[1]["train_steps"] == 2 and rows[0]["train_steps"] == 0
    assert rows[1]["ppl_fp"] != rows[0]["ppl_fp"] and rows[0]["ppl_w8a8"] != rows[0]["ppl_fp"]
    run = next((out / "runs").rglob("recipe.yaml"))
    stamp = run.stat().st_mtime_ns
    assert len(list((out / "stats").glob("*.json"))) == 2
    plot = next(out.glob("outliers-*.png"))
    plot.unlink()

    def measured_again(*args, **kwargs):
        raise AssertionError("a finished arm was measured again")

    monkeypatch.setattr(training_table, "_measure", measured_again)
    assert main(["reproduce", str(table), "--out", str(out)]) == 0
    monkeypatch.undo()
    assert run.stat().st_mtime_ns == stamp  # reused, not retrained
    assert plot.is_file()  # redrawn from the kept statistics
    assert len(json.loads((out / "table.json").read_text())["rows"]) == 2
    # a measure added to the finished table: only it is measured, the rows keep their other numbers
    spec = yaml.safe_load(table.read_text())
    table.write_text(
        yaml.safe_dump(
            {
                **spec,
                "measure": ["perplexity", "ood", "w8a8", "outliers"],
                "eval": {**spec["eval"], "ood_windows": 2},
            }
        )
    )
    calls = []
    real_measure = training_table._measure

    def spy(*args, **kwargs):
        calls.append(args[-1])
        return real_measure(*args, **kwargs)

    monkeypatch.setattr(training_table, "_measure", spy)
    assert main(["reproduce", str(table), "--out", str(out)]) == 0
    monkeypatch.undo()
    assert calls == [["ood"], ["ood"]]
    again = json.loads((out / "table.json").read_text())["rows"]
    assert [{k: v for k, v in r.items() if k != "ppl_ood"} for r in again] == rows
    assert again[1]["ppl_ood"] != again[0]["ppl_ood"] and "OOD ppl" in (out / "table.md").read_text()
    table.write_text(yaml.safe_dump(spec))
    # a fresh clone has the committed recipe but not the (git-ignored) trained states: the arm trains again
    for state in run.parent.glob("*.safetensors"):
        state.unlink()
    assert main(["reproduce", str(table), "--out", str(out)]) == 0
    assert run.stat().st_mtime_ns != stamp and list(run.parent.glob("*.safetensors"))
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        yaml.safe_dump({"kind": "training", "models": ["x"], "arms": [{"name": "a", "trian": {}}]})
    )
    assert main(["reproduce", str(bad)]) == 5


def test_progress_false_writes_nothing(data, capsys):
    """Library callers (the temperature fit's progress=False) get no validation or early-stopping lines."""
    model = tiny_model("llama")
    handle = patch(model, "head_scale", trainable=True)
    result = train(model, handle, data, cfg(steps=4, val_every=1, patience=1, lr=5.0), progress=False)
    handle.remove()
    assert len(result.val_history) >= 2
    captured = capsys.readouterr()
    assert "validation objective" not in captured.out + captured.err
    assert "stopping early" not in captured.out + captured.err


@pytest.mark.parametrize(
    "surgery", ["clipped_softmax", "reweight", "temperature", "head_scale", "gated_attention", "act"]
)
def test_gradients_flow_through_every_trainable_path(surgery):
    """Fine-tuning under a surgery (the clipped-softmax fine-tune, LoRA under gates ...): backward works on its
    code path (tiled normaliser included) and reaches the adapters."""
    from attnsurgery.registry import get_surgery_class

    model = tiny_model("llama")
    for p in model.parameters():
        p.requires_grad_(False)
    ids = random_ids(2, 12)
    with patch(model, surgery, **get_surgery_class(surgery).example_args), patch(model, "lora", r=2) as lora:
        model(ids, labels=ids).loss.backward()
        grads = [pair["B"].weight.grad for pair in lora.surgeries[0].adapters.values()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_validation_curves_plot_every_trained_arm_and_term(tmp_path):
    """One panel per recorded validation term (ppl left out: it repeats lm), one line per arm with a curve; arms
    without a finished run, or with a single validation, are left out; no curve at all draws nothing."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    from attnsurgery.eval.training_table_report import plot_validation_curves

    def history(*terms):
        return [
            {"step": s, "objective": 1.0 / (s + 1), "ppl": 9.0, **{t: 0.5 for t in terms}} for s in (0, 5, 10)
        ]

    for name, validation in [
        ("a", history("lm", "sink")),
        ("b", history("lm", "outlier")),
        ("c", history()[:1]),
    ]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "training.json").write_text(json.dumps({"validation": validation}))
    arms = [{"name": n} for n in ("baseline", "a", "b", "c")]
    drawn = {}
    real_subplots = plt.subplots
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plt, "subplots", lambda *a, **k: drawn.setdefault("fig", real_subplots(*a, **k)))
        path = plot_validation_curves(tmp_path, arms, tmp_path / "v.png", "tiny")
    assert path.is_file()
    axes = drawn["fig"][1][0]
    assert [ax.get_title() for ax in axes] == ["objective", "lm", "sink", "outlier"]
    assert [len(ax.get_lines()) for ax in axes] == [2, 2, 1, 1]
    assert [t.get_text() for t in axes[-1].get_legend().get_texts()] == ["a", "b"]
    assert plot_validation_curves(tmp_path, [{"name": "c"}], tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


def test_training_table_keeps_rows_another_process_wrote(tmp_path):
    """Two `reproduce --model` runs of one table at once: each read table.json when it started, and the one that
    writes last must not drop the other's rows (it adds and updates only its own)."""
    from attnsurgery.eval.training_table import _write_results
    from attnsurgery.eval.training_table_def import TrainingTable

    table = TrainingTable(name="t", models=["a", "b"], arms=[{"name": "x"}], measure=("perplexity",))
    row = {"ppl_fp": 1.0, "train_steps": 0, "train_tokens": 0, "train_minutes": 0.0, "test_windows": 2}
    mine = {"rows": [{"model": "a", "arm": "x", **row}]}  # what process A read at its start, plus its new row
    (tmp_path / "table.json").write_text(
        json.dumps(
            {"rows": [{"model": "a", "arm": "x", **row, "ppl_fp": 9.0}, {"model": "b", "arm": "x", **row}]}
        )
    )
    _write_results(tmp_path, mine, table)
    rows = json.loads((tmp_path / "table.json").read_text())["rows"]
    assert [(r["model"], r["arm"], r["ppl_fp"]) for r in rows] == [("a", "x", 1.0), ("b", "x", 1.0)]
    assert "| b | x |" in (tmp_path / "table.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.json", "table.md"]  # no temporary left


def test_training_table_stages_training_free_arms_measure_and_tasks(tmp_path):
    """The training-table arms a conversion needs: a training-free arm (patched as is), an arm trained `from` an
    earlier one (its surgeries loaded and frozen, a LoRA stage on top; costs add up), `measure:` choosing the
    scores, and `tasks:` scoring every arm's recipe on an offline lm-eval task with paired deltas."""
    from safetensors.torch import load_file

    from attnsurgery.eval.training_table import run_training_table

    model_dir = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    table = tmp_path / "t.yaml"
    gates = [{"surgery": "gated_attention", "args": {"form": "headwise", "init_std": 0.3}}]
    table.write_text(
        yaml.safe_dump(
            {
                "name": "t",
                "kind": "training",
                "models": [str(model_dir), "other-model"],
                "seq_len": SEQ,
                "measure": ["perplexity"],
                "tasks": ["bb_emoji_movie"],
                "limit": 3,
                "eval": {"test_windows": 2, "calib_windows": 2},
                "arms": [
                    {"name": "baseline"},
                    {"name": "free", "surgeries": gates},
                    {"name": "elsewhere", "surgeries": gates, "models": ["other-model"]},
                    {
                        "name": "stage1",
                        "surgeries": gates,
                        "train": {"steps": 2, "batch_size": 2, "lr": 0.05},
                    },
                    {
                        "name": "stage2",
                        "from": "stage1",
                        "train": {"steps": 2, "batch_size": 2, "lora": {"r": 2}},
                    },
                ],
            }
        )
    )
    out = run_training_table(table, tmp_path / "out", models=[str(model_dir)])
    rows = {r["arm"]: r for r in json.loads((out / "table.json").read_text())["rows"]}
    assert "elsewhere" not in rows  # an arm limited to another model
    assert set(rows["baseline"]) >= {"ppl_fp"} and "ppl_w8a8" not in rows["baseline"]
    assert "W8A8" not in (out / "table.md").read_text() and not list(out.glob("outliers-*.png"))
    assert rows["free"]["train_steps"] == 0 and rows["free"]["ppl_fp"] != rows["baseline"]["ppl_fp"]
    assert rows["stage2"]["train_steps"] == 4  # its own 2 steps plus stage 1's
    runs = out / "runs" / next((out / "runs").iterdir()).name
    assert (out / f"validation-{runs.name}.png").is_file()  # the trained arms' validation curves
    stage1 = load_file(str(runs / "stage1" / "state-0-gated_attention.safetensors"))
    stage2 = load_file(str(runs / "stage2" / "state-0-gated_attention.safetensors"))
    assert stage1.keys() == stage2.keys() and all(torch.equal(stage1[k], stage2[k]) for k in stage1)  # frozen
    surgeries = [
        s["surgery"] for s in yaml.safe_load((runs / "stage2" / "recipe.yaml").read_text())["surgeries"]
    ]
    assert surgeries == ["gated_attention", "lora"]
    report = json.loads((out / "tasks.json").read_text())["reports"][0]
    assert list(report["arms"]) == ["baseline", "free", "stage1", "stage2"]
    assert {"delta", "p"} <= set(report["table"][0]["arms"]["stage2"])  # paired against the baseline
    assert (out / "tasks.md").is_file()
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        yaml.safe_dump(
            {"kind": "training", "models": ["x"], "measure": ["perplexty"], "arms": [{"name": "baseline"}]}
        )
    )
    from attnsurgery.errors import RecipeError
    from attnsurgery.eval.training_table_def import load_training_table

    with pytest.raises(RecipeError, match="Did you mean 'perplexity'"):
        load_training_table(bad)
    bad.write_text(
        yaml.safe_dump(
            {"kind": "training", "models": ["x"], "arms": [{"name": "a", "from": "b", "train": {"steps": 1}}]}
        )
    )
    with pytest.raises(RecipeError, match="earlier arm"):
        load_training_table(bad)


def test_train_base_attention_trains_copies_and_remove_restores(data, tmp_path):
    """--train-base attention (the finetune surgery): the attention projections' weights train as copies at
    lora_lr, the kd teacher sees the original weights, the run folder reloads onto a fresh model, and remove()
    puts the original parameter objects back, untouched."""
    from attnsurgery.cli import main

    model_dir = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    out = tmp_path / "run"
    argv = ["train", str(model_dir), "--train-base", "attention", "--layers", "1:", "--objective", "lm+kd"]
    argv += [
        "--steps",
        "3",
        "--batch-size",
        "2",
        "--seq-len",
        str(SEQ),
        "--val-every",
        "3",
        "--val-windows",
        "2",
    ]
    assert main([*argv, "--lora-lr", "0.01", "--out", str(out)]) == 0
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    before = recipe["training"]["validation"]["before"]
    # exact: the copies equal the originals bit for bit at init, and kd_loss is exactly 0 on equal logits
    assert before["objective"] == before["lm"]
    assert recipe["surgeries"][0]["surgery"] == "finetune"
    model = tiny_model("llama")
    originals = {n: p for n, p in model.named_parameters()}
    values = {n: p.detach().clone() for n, p in originals.items()}
    ids = random_ids(1, 12)
    ref = logits(model, ids)
    with patch(model, str(out)) as handle:
        trained = dict(model.named_parameters())
        changed = [n for n in trained if trained[n] is not originals[n]]
        # the attention projections of layers 1.. only, weights and (none here) biases
        assert changed and all(".self_attn." in n and not n.startswith("model.layers.0.") for n in changed)
        assert any(not torch.equal(trained[n], values[n]) for n in changed)  # they trained
        assert (logits(model, ids) - ref).abs().max() > logit_atol("llama")  # moved by more than float noise
        with Engine.of(model).disabled():  # the teacher: the original weights, exactly
            torch.testing.assert_close(logits(model, ids), ref, atol=0, rtol=0)
        assert handle.surgeries[0].weights  # the copies are the surgery's state
    assert all(p is originals[n] and torch.equal(p, values[n]) for n, p in model.named_parameters())
    torch.testing.assert_close(logits(model, ids), ref, atol=0, rtol=0)
    assert main([*argv, "--train-base", "q_prj", "--out", str(tmp_path / "bad")]) == 4  # did-you-mean
    assert not (tmp_path / "bad").exists()


def test_act_gradients_fused_equal_tiled():
    """Fine-tuning under ACT: the gradients through its fused kernel (one stats pass + the low-rank correction)
    equal those through the plain tiled path (softmax, then the probability edit), to float noise."""
    import attnsurgery.engine as engine_module

    ids = random_ids(2, 16)

    def lora_grads(act: bool, dtype=torch.float32):
        model = tiny_model("llama")
        for p in model.parameters():
            p.requires_grad_(False)
        with (
            patch(model, "act", beta=0.3, threshold=0.08) if act else contextlib.nullcontext(),
            patch(model, "lora", r=2, init="random") as lora,
        ):
            model.to(dtype)
            lora.surgeries[0].to(dtype)
            model(ids, labels=ids).loss.backward()
            return torch.cat([p["A"].weight.grad.flatten() for p in lora.surgeries[0].adapters.values()])

    grads = {}
    for fused in (True, False):
        engine_module.FUSED_KERNELS = fused
        try:
            grads[fused] = lora_grads(act=True)
        finally:
            engine_module.FUSED_KERNELS = True
    assert grads[True].abs().sum() > 0
    # the gradient's float noise on this machine: the same LoRA gradient through the stock kernel (no ACT), float32
    # against float64 (the same weights, converted after patching)
    stock = lora_grads(act=False)
    atol = NOISE_FACTOR * float_noise(stock, lora_grads(act=False, dtype=torch.float64))
    torch.testing.assert_close(grads[True], grads[False], atol=atol, rtol=0)
    assert (grads[True] - stock).abs().max() > atol  # the stock kernel's gradients fail it: ACT's edit shows


def test_training_table_checks_goals_that_name_a_column():
    """Goals reading as a relative bound on a column are checked per arm ('goals met') and summarised; free-text
    goals are listed only."""
    from attnsurgery.eval.training_table_def import TrainingTable
    from attnsurgery.eval.training_table_report import render_training_table

    table = TrainingTable(
        name="t",
        models=["m"],
        arms=[],
        goals={
            "first-token share": "-50% relative",
            "FP ppl": "within +2%",
            "hybrid": "within +10% of softmax",
        },
    )
    common = {"model": "m", "train_steps": 1, "train_tokens": 1, "train_minutes": 0.1, "test_windows": 2}
    rows = [
        {**common, "arm": "baseline", "ppl_fp": 10.0, "sink_share": 0.4},
        {**common, "arm": "good", "ppl_fp": 10.19, "sink_share": 0.19},
        {**common, "arm": "costly", "ppl_fp": 10.3, "sink_share": 0.1},
        {**common, "arm": "weak", "ppl_fp": 9.0, "sink_share": 0.21},
    ]
    text = render_training_table({"rows": rows}, table)
    lines = {line.split(" | ")[1]: line for line in text.splitlines() if line.startswith("| m |")}
    assert lines["good"].endswith("| 2/2 |") and lines["costly"].endswith("| 1/2 |")
    assert lines["weak"].endswith("| 1/2 |") and lines["baseline"].endswith("|  |")
    assert "- m: every goal met by good" in text
    rows[1]["ppl_fp"] = 10.3
    assert "- m: no arm meets every goal" in render_training_table({"rows": rows}, table)


@pytest.mark.parametrize("keep", ["last", "best"])
def test_recipe_reports_the_numbers_of_the_state_it_ships(data, tmp_path, keep):
    """recipe.yaml's description and training.validation.kept are the shipped state's (last or best), never another
    step's numbers."""
    model = tiny_model("llama")
    handle = patch(model, "gated_attention", form="headwise", init_std=0.3)
    result = train(model, handle, data, cfg(steps=6, val_every=1, lr=0.3, keep=keep), out_dir=tmp_path / "r")
    recipe = yaml.safe_load((tmp_path / "r" / "recipe.yaml").read_text())
    step = result.best_step if keep == "best" else result.steps
    shipped = next(r for r in result.val_history if r["step"] == step)
    assert recipe["training"]["validation"]["kept"] == shipped
    assert f"-> {shipped['lm']:.4f} at step {step} (the {keep} state" in recipe["description"]
    handle.remove()


def test_check_run_folder_is_the_one_output_check(tmp_path):
    """train(), `attnsurgery train` and linearize share one check of the run folder, made before a model loads."""
    from attnsurgery.train import check_run_folder

    check_run_folder(tmp_path / "new")  # a new folder: fine
    (tmp_path / "empty").mkdir()
    check_run_folder(tmp_path / "empty")  # an empty one too
    (tmp_path / "file").write_text("x")
    with pytest.raises(TrainingError, match="is a file"):
        check_run_folder(tmp_path / "file")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "recipe.yaml").write_text("x")
    with pytest.raises(TrainingError, match="already exists; pass --resume"):
        check_run_folder(tmp_path / "run")
    with pytest.raises(TrainingError, match="not both"):
        check_run_folder(tmp_path / "run", resume=True, overwrite=True)
    with pytest.raises(TrainingError, match="holds no checkpoint.pt"):
        check_run_folder(tmp_path / "run", resume=True)
    check_run_folder(tmp_path / "run", resume=True, checkpoint=None)  # linearize checks each stage's own
    check_run_folder(tmp_path / "run", overwrite=True)
    assert (tmp_path / "run" / "recipe.yaml").is_file()  # a check writes and removes nothing
