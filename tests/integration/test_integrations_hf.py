"""MoEScopeTrainerCallback in real HF Trainer runs of a tiny Mixtral on CPU: steps, accumulation, logs, eval, resume."""

from __future__ import annotations

import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="the HF Trainer needs accelerate (pyproject [hf] extra)")

import pyarrow.parquet as pq  # noqa: E402
from hf_helpers import plant_collapse, tiny_mixtral  # noqa: E402
from transformers import Trainer, TrainerControl, TrainerState, TrainingArguments  # noqa: E402

from moescope.capture.alerts import MoEAlertWarning, RoutingCollapseError  # noqa: E402
from moescope.integrations.hf import MoEScopeTrainerCallback, _rank_of  # noqa: E402

pytestmark = pytest.mark.hf  # tiny transformers Mixtral in real training runs

BATCH, SEQ, K = 4, 16, 2
METRICS = ("load_cv", "maxvio", "entropy_norm", "dead_experts")


def dataset(n: int, seed: int = 0) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 100, (n, SEQ), generator=g)
    return [{"input_ids": x, "labels": x} for x in ids]


def args(tmp: Path, **kw: Any) -> TrainingArguments:
    opts: dict[str, Any] = dict(
        output_dir=str(tmp / "out"),
        per_device_train_batch_size=BATCH,
        per_device_eval_batch_size=BATCH,
        learning_rate=1e-3,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=1,
        dataloader_num_workers=0,
        seed=0,
    )
    opts.update(kw)
    return TrainingArguments(**opts)


def test_train_records_global_steps_folds_accumulation_and_logs(tmp_path: Path) -> None:
    run = tmp_path / "traces" / "run-a"
    cb = MoEScopeTrainerCallback(run, flush_every=2)
    a = args(
        tmp_path,
        max_steps=4,
        gradient_accumulation_steps=2,
        eval_strategy="steps",
        eval_steps=2,
        report_to=["tensorboard"],
    )
    trainer = Trainer(
        model=tiny_mixtral(), args=a, train_dataset=dataset(32), eval_dataset=dataset(BATCH, 1), callbacks=[cb]
    )
    cb.set_trainer(trainer)
    trainer.train()
    assert trainer.state.global_step == 4 and cb.recorder is None

    stats = pq.read_table(run / "router_stats").to_pandas()
    train = stats[stats.tag == ""]
    assert sorted(train.step.unique()) == [0, 1, 2, 3]  # optimizer steps, not micro-batches
    assert (train.groupby(["step", "layer"]).tokens.sum() == 2 * BATCH * SEQ).all()  # 2 micro-batches folded
    load = pq.read_table(run / "expert_load").to_pandas()
    tl = load[load.tag == ""]
    assert (tl.groupby(["step", "layer"]).tokens.sum() == 2 * BATCH * SEQ * K).all()
    assert not load.duplicated(["step", "tag", "layer", "expert"]).any()
    ev = stats[stats.tag == "eval"]
    # Evaluation runs after optimizer steps 2 and 4: its forwards are tagged, at the step that follows.
    assert sorted(ev.step.unique()) == [2, 4] and (ev.groupby(["step", "layer"]).tokens.sum() == BATCH * SEQ).all()

    # Scalars reached log_history through trainer.log: window 0–1 ends at HF step 2, window 2–3 at step 4.
    logged = [h for h in trainer.state.log_history if "moescope/layer0/load_cv" in h]
    assert [h["step"] for h in logged] == [2, 4]
    for h in logged:
        assert all(f"moescope/layer{L}/{m}" in h for L in (0, 1) for m in METRICS)
    assert [s for s, _ in cb.history] == [1, 3]

    # …and the TensorBoard integration: scalars, plus a one-bin-per-expert histogram from the callback.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (logdir,) = {p.parent for p in (tmp_path / "out").rglob("events.out.tfevents.*")}
    acc = EventAccumulator(str(logdir), size_guidance={"histograms": 0, "scalars": 0})
    acc.Reload()
    assert "train/moescope/layer1/maxvio" in acc.Tags()["scalars"]  # transformers prefixes training logs
    hist = acc.Histograms("moescope/layer0/expert_load")
    assert hist[0].step == 2 and hist[0].histogram_value.bucket_limit == [0.5, 1.5, 2.5, 3.5]
    assert sum(hist[0].histogram_value.bucket) == 2 * 2 * BATCH * SEQ * K


def test_unbound_callback_merges_into_log_history(tmp_path: Path) -> None:
    cb = MoEScopeTrainerCallback(tmp_path / "run", flush_every=2)
    trainer = Trainer(
        model=tiny_mixtral(),
        args=args(tmp_path, max_steps=4, logging_steps=50, eval_strategy="epoch"),
        train_dataset=dataset(16),
        eval_dataset=dataset(BATCH, 1),
        callbacks=[cb],
    )
    trainer.train()
    st = pq.read_table(tmp_path / "run" / "router_stats").to_pandas()
    # The epoch (4 steps) ends with an evaluation: tagged, and kept out of the training steps.
    assert sorted(st[st.tag == "eval"].step.unique()) == [4]
    assert sorted(st[st.tag == ""].step.unique()) == [0, 1, 2, 3] and (st[st.tag == ""].tokens == BATCH * SEQ).all()
    logged = [h for h in trainer.state.log_history if "moescope/layer1/entropy_norm" in h]
    # logging_steps=50 would log nothing before the end: the callback asks for a log at each flush.
    assert [h["step"] for h in logged] == [2, 4] and all("loss" in h for h in logged)


def test_resume_from_checkpoint_continues_without_duplicates(tmp_path: Path) -> None:
    run = tmp_path / "run"
    a1 = args(tmp_path, max_steps=6, save_strategy="steps", save_steps=4)
    Trainer(
        model=tiny_mixtral(),
        args=a1,
        train_dataset=dataset(40),
        callbacks=[MoEScopeTrainerCallback(run, flush_every=2)],
    ).train()
    ckpt = tmp_path / "out" / "checkpoint-4"
    assert ckpt.is_dir()
    cb = MoEScopeTrainerCallback(run, flush_every=2)
    t2 = Trainer(model=tiny_mixtral(1), args=args(tmp_path, max_steps=10), train_dataset=dataset(40), callbacks=[cb])
    t2.train(resume_from_checkpoint=str(ckpt))
    assert t2.state.global_step == 10
    load = pq.read_table(run / "expert_load").to_pandas()
    assert not load.duplicated(["step", "tag", "layer", "expert"]).any()
    assert sorted(load.step.unique()) == list(range(10))
    assert (load.groupby(["step", "layer"]).tokens.sum() == BATCH * SEQ * K).all()


def test_raise_on_fail_stops_training(tmp_path: Path) -> None:
    model = tiny_mixtral()
    plant_collapse(model)
    seen: list[Any] = []
    cb = MoEScopeTrainerCallback(tmp_path / "run", flush_every=2, raise_on="fail", on_alert=seen.append)
    trainer = Trainer(model=model, args=args(tmp_path, max_steps=20), train_dataset=dataset(80), callbacks=[cb])
    with warnings.catch_warnings(), pytest.raises(RoutingCollapseError, match=r"routing collapsed|dead"):
        warnings.simplefilter("ignore", MoEAlertWarning)
        trainer.train()
    assert trainer.state.global_step == 2  # the window 0–1 flushed at the end of step 2 and stopped training
    assert {a.rule for a in seen} >= {"collapse", "dead_expert"} and {a.layer for a in seen} == {0, 1}
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == 0
    assert sorted(set(pq.read_table(tmp_path / "run" / "expert_load").column("step").to_pylist())) == [0, 1]


def test_rank_naming(tmp_path: Path) -> None:
    assert _rank_of(SimpleNamespace(process_index=3)) == 3
    model = tiny_mixtral()
    cb = MoEScopeTrainerCallback(tmp_path / "run")
    fake_args = SimpleNamespace(process_index=1, world_size=2)
    state, control = TrainerState(), TrainerControl()
    cb.on_train_begin(fake_args, state, control, model=model)  # type: ignore[arg-type]
    assert cb.recorder.rank == 1
    cb.on_step_begin(fake_args, state, control)  # type: ignore[arg-type]
    model(input_ids=torch.randint(0, 100, (1, 8)))
    cb.on_train_end(fake_args, state, control)  # type: ignore[arg-type]
    parts = [p.name for p in (tmp_path / "run" / "expert_load").iterdir()]
    assert parts and all(p.startswith("part-1-") for p in parts)


def doc_example(heading: str) -> str:
    """The python block under `### heading` in docs/integrations.md."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "integrations.md").read_text()
    return text.split(f"### {heading}\n", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]


def test_docs_hf_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    exec(compile(doc_example("Hugging Face Trainer"), "docs/integrations.md", "exec"), {"__name__": "doc_example"})
    st = pq.read_table(tmp_path / "traces" / "hf-run" / "router_stats").to_pandas()
    assert sorted(st.step.unique()) == list(range(8)) and (st.tokens == 2 * 8 * 32).all()


def padded_dataset(n: int) -> list[dict[str, Any]]:
    """Rows with 4 left-padding tokens each: the recorded tokens are the real ones only."""
    rows = dataset(n)
    mask = torch.ones(SEQ, dtype=torch.long)
    mask[:4] = 0
    return [{**r, "attention_mask": mask} for r in rows]


@pytest.mark.slow
@pytest.mark.parametrize("switch", ["gradient_checkpointing", "torch_compile"])
def test_trainer_switches_record_each_step_once(switch: str, tmp_path: Path) -> None:
    """The Trainer's own switches: recompute forwards are not recorded again, compiled steps are recorded."""
    run = tmp_path / "run"
    cb = MoEScopeTrainerCallback(run, flush_every=2, alerts=False)
    kw: dict[str, Any] = {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False}} \
        if switch == "gradient_checkpointing" else {"torch_compile": True}
    if switch == "torch_compile":
        torch._dynamo.reset()
    trainer = Trainer(model=tiny_mixtral().train(), args=args(tmp_path, max_steps=3, **kw),
                      train_dataset=padded_dataset(16), callbacks=[cb])
    trainer.train()
    if switch == "torch_compile":
        torch._dynamo.reset()
    load = pq.read_table(run / "expert_load").to_pandas()
    assert sorted(load.step.unique()) == [0, 1, 2]  # trace steps = global steps
    # assignments per step per layer = real tokens × k (not twice that, and no padding)
    assert (load.groupby(["step", "layer"]).tokens.sum() == BATCH * (SEQ - 4) * K).all()
    stats = pq.read_table(run / "router_stats").to_pandas()
    assert (stats.tokens == BATCH * (SEQ - 4)).all() and (stats.nonfinite == 0).all()


def test_the_trainers_tokenizer_is_stored_for_decoding(tmp_path: Path) -> None:
    """The Trainer's processing_class says how to decode the trace's token ids: its path lands in the manifest."""
    import json

    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(100)} | {"[UNK]": 100, "[PAD]": 101}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")),
                            unk_token="[UNK]", pad_token="[PAD]").save_pretrained(tmp_path / "tok")
    tok = PreTrainedTokenizerFast.from_pretrained(str(tmp_path / "tok"))
    run = tmp_path / "traces" / "run-a"
    cb = MoEScopeTrainerCallback(run, flush_every=1)
    Trainer(model=tiny_mixtral(), args=args(tmp_path, max_steps=1), train_dataset=dataset(BATCH),
            processing_class=tok, callbacks=[cb]).train()
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["model"]["tokenizer"] == str((tmp_path / "tok").resolve())
    from moescope.analysis.vocab import decoder_for

    assert decoder_for(manifest["model"]["tokenizer"]).text(5) == "w5"
