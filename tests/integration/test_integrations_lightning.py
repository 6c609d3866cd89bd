"""MoEScopeCallback in real Lightning fits of a tiny Mixtral on CPU: steps, accumulation, loggers, resume, alerts."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

pl = pytest.importorskip("lightning.pytorch")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import pyarrow.parquet as pq  # noqa: E402
from hf_helpers import plant_collapse, tiny_mixtral  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from moescope.capture.alerts import MoEAlertWarning, RoutingCollapseError  # noqa: E402
from moescope.integrations.lightning import MoEScopeCallback  # noqa: E402

pytestmark = pytest.mark.hf  # tiny transformers Mixtral in real training runs

BATCH, SEQ, K = 4, 16, 2


class TinyLM(pl.LightningModule):
    """A LightningModule whose training_step calls the wrapped HF model (not self.forward)."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        (ids,) = batch
        return self.model(input_ids=ids, labels=ids).loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        (ids,) = batch
        self.log("val_loss", self.model(input_ids=ids, labels=ids).loss)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def loader(n_batches: int, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(torch.randint(0, 100, (n_batches * BATCH, SEQ), generator=g)), batch_size=BATCH)


def trainer(tmp: Path, **kw: Any) -> Any:
    opts: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        default_root_dir=str(tmp),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    opts.update(kw)
    return pl.Trainer(**opts)


def test_fit_records_global_steps_folds_accumulation_and_logs(tmp_path: Path) -> None:
    run = tmp_path / "traces" / "run-a"
    cb = MoEScopeCallback(run, flush_every=2)
    csv_logger = CSVLogger(str(tmp_path), name="csv", version=0)
    tb_logger = TensorBoardLogger(str(tmp_path), name="tb", version=0)
    t = trainer(
        tmp_path,
        max_steps=4,
        accumulate_grad_batches=2,
        callbacks=[cb],
        logger=[csv_logger, tb_logger],
        limit_val_batches=1,
        num_sanity_val_steps=1,
        log_every_n_steps=1,
    )
    t.fit(TinyLM(tiny_mixtral()), loader(8), loader(1, seed=1))
    assert t.global_step == 4 and cb.recorder is None  # closed after fit

    stats = pq.read_table(run / "router_stats").to_pandas()
    train = stats[stats.tag == ""]
    assert sorted(train.step.unique()) == [0, 1, 2, 3]  # global (optimizer) steps, not batches
    # Two micro-batches fold into each step: every layer saw accumulation × batch tokens.
    assert (train.groupby(["step", "layer"]).tokens.sum() == 2 * BATCH * SEQ).all()
    load = pq.read_table(run / "expert_load").to_pandas()
    tl = load[load.tag == ""]
    assert (tl.groupby(["step", "layer"]).tokens.sum() == 2 * BATCH * SEQ * K).all()
    assert not tl.duplicated(["step", "layer", "expert"]).any()
    assert set(stats.tag) == {"", "val"}  # sanity check and epoch-end validation, kept apart
    assert {p.name.split("-")[1] for p in (run / "expert_load").iterdir()} == {"0"}

    # Two flushes of two steps each reached the CSV logger, named per layer.
    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    mrows = [r for r in rows if r.get("moescope/layer0/load_cv")]
    assert [int(r["step"]) for r in mrows] == [1, 3]
    for layer in (0, 1):
        for name in ("load_cv", "maxvio", "entropy_norm", "dead_experts"):
            assert all(r[f"moescope/layer{layer}/{name}"] != "" for r in mrows)
    assert [s for s, _ in cb.history] == [1, 3]
    e = float(mrows[0]["moescope/layer0/entropy_norm"])
    assert 0.0 < e <= 1.0

    # TensorBoard: the scalars and a one-bin-per-expert histogram per layer.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb" / "version_0"), size_guidance={"histograms": 0, "scalars": 0})
    acc.Reload()
    assert "moescope/layer1/maxvio" in acc.Tags()["scalars"]
    hist = acc.Histograms("moescope/layer0/expert_load")
    assert [h.step for h in hist] == [1, 3]
    h = hist[0].histogram_value
    assert h.bucket_limit == [0.5, 1.5, 2.5, 3.5] and sum(h.bucket) == 2 * 2 * BATCH * SEQ * K


class MixedLM(TinyLM):
    """training_step calls self.model, validation_step goes through self.forward: the hooked forward runs only in val."""

    def forward(self, ids: Any) -> Any:
        return self.model(input_ids=ids, labels=ids)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        (ids,) = batch
        self.log("val_loss", self(ids).loss)


def test_training_forwards_are_not_attributed_to_validation(tmp_path: Path) -> None:
    run = tmp_path / "run"
    t = trainer(
        tmp_path,
        max_steps=4,
        callbacks=[MoEScopeCallback(run, flush_every=2)],
        limit_val_batches=1,
        num_sanity_val_steps=1,
        val_check_interval=2,
    )
    t.fit(MixedLM(tiny_mixtral()), loader(4), loader(1, seed=1))
    st = pq.read_table(run / "router_stats").to_pandas()
    train, val = st[st.tag == ""], st[st.tag == "val"]
    assert sorted(train.step.unique()) == [0, 1, 2, 3] and (train.tokens == BATCH * SEQ).all()
    assert sorted(val.step.unique()) == [0, 2, 4] and (val.tokens == BATCH * SEQ).all()


def test_ckpt_resume_continues_without_duplicates(tmp_path: Path) -> None:
    run = tmp_path / "run"
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), filename="{step}", every_n_train_steps=4, save_top_k=-1)
    # module="model": the hooked module's own forward runs, so the recorder also sees input_ids.
    t1 = trainer(
        tmp_path,
        max_steps=6,
        enable_checkpointing=True,
        callbacks=[MoEScopeCallback(run, flush_every=2, module="model"), ckpt],
    )
    t1.fit(TinyLM(tiny_mixtral()), loader(10))
    assert (tmp_path / "ckpt" / "step=4.ckpt").exists()

    # Resume from step 4 although the trace already holds steps 4 and 5: they must not be written twice.
    cb2 = MoEScopeCallback(run, flush_every=2, module="model")
    t2 = trainer(tmp_path, max_steps=10, callbacks=[cb2])
    t2.fit(TinyLM(tiny_mixtral(seed=1)), loader(10), ckpt_path=str(tmp_path / "ckpt" / "step=4.ckpt"))
    assert t2.global_step == 10

    load = pq.read_table(run / "expert_load").to_pandas()
    assert not load.duplicated(["step", "tag", "layer", "expert"]).any()
    assert sorted(load.step.unique()) == list(range(10))
    counts = load.groupby(["step", "layer"]).tokens.sum()
    assert (counts == BATCH * SEQ * K).all()
    assert [s for s, _ in cb2.history] == [7, 9]


def test_raise_on_fail_stops_fit_early(tmp_path: Path) -> None:
    model = tiny_mixtral()
    plant_collapse(model)
    seen: list[Any] = []
    cb = MoEScopeCallback(tmp_path / "run", flush_every=2, raise_on="fail", on_alert=seen.append)
    t = trainer(tmp_path, max_steps=20, callbacks=[cb])
    with warnings.catch_warnings(), pytest.raises(RoutingCollapseError, match=r"layer \d"):
        warnings.simplefilter("ignore", MoEAlertWarning)
        t.fit(TinyLM(model), loader(20))
    assert t.global_step == 2  # window 0–1 flushed at the start of step 2 and stopped the run
    assert {a.rule for a in seen} >= {"collapse", "dead_expert"}
    assert cb.recorder is None
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == 0
    assert sorted(set(pq.read_table(tmp_path / "run" / "expert_load").column("step").to_pylist())) == [0, 1]


def test_alerts_warn_without_stopping(tmp_path: Path) -> None:
    model = tiny_mixtral()
    plant_collapse(model)
    cb = MoEScopeCallback(tmp_path / "run", flush_every=2)
    t = trainer(tmp_path, max_steps=4, callbacks=[cb])
    with pytest.warns(MoEAlertWarning) as record:
        t.fit(TinyLM(model), loader(4))
    assert any("routing collapsed" in str(w.message) for w in record)
    assert t.global_step == 4
    assert cb.history and cb.history[0][1]["moescope/layer0/dead_experts"] == 2.0


def test_callback_passes_rank_through(tmp_path: Path) -> None:
    # DDP on 2 CPU processes is too slow here; the callback's only rank duty is handing global_rank over.
    lm = TinyLM(tiny_mixtral())
    fake = SimpleNamespace(global_rank=1, world_size=2, loggers=[], is_global_zero=False)
    cb = MoEScopeCallback(tmp_path / "run", module="model")
    cb.setup(fake, lm, "fit")  # type: ignore[arg-type]
    assert cb.recorder.rank == 1
    fake.global_step = 0
    cb.on_train_batch_start(fake, lm, None, 0)  # type: ignore[arg-type]
    lm.model(input_ids=torch.randint(0, 100, (1, 8)))
    cb.teardown(fake, lm, "fit")  # type: ignore[arg-type]
    parts = [p.name for p in (tmp_path / "run" / "expert_load").iterdir()]
    assert parts and all(p.startswith("part-1-") for p in parts)


def doc_example(heading: str) -> str:
    """The python block under `### heading` in docs/integrations.md."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "integrations.md").read_text()
    return text.split(f"### {heading}\n", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]


def test_docs_lightning_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    exec(compile(doc_example("Lightning"), "docs/integrations.md", "exec"), {"__name__": "doc_example"})
    st = pq.read_table(tmp_path / "traces" / "lightning-run" / "router_stats").to_pandas()
    assert sorted(st.step.unique()) == list(range(8)) and (st.tokens == 2 * 8 * 32).all()
    with open(next((tmp_path / "logs").rglob("metrics.csv"))) as fh:
        assert "moescope/layer1/dead_experts" in fh.readline()


@pytest.mark.dist
def test_ddp_each_rank_writes_its_own_parts(tmp_path: Path) -> None:
    # Two gloo processes on CPU (ddp_spawn): about a minute here, hence the dist marker. Per-rank parts are
    # reduce="none"; the default sums them over the ranks (tests/integration/test_reduce.py).
    run = tmp_path / "run"
    cb = MoEScopeCallback(run, flush_every=2, reduce="none")
    t = trainer(tmp_path, max_steps=3, devices=2, strategy="ddp_spawn", callbacks=[cb])
    t.fit(TinyLM(tiny_mixtral()), loader(8))
    load = pq.read_table(run / "expert_load").to_pandas()
    assert {r: sorted(g.step.unique()) for r, g in load.groupby("rank")} == {0: [0, 1, 2], 1: [0, 1, 2]}
    assert (load.groupby(["rank", "step", "layer"]).tokens.sum() == BATCH * SEQ * K).all()
    for p in (run / "expert_load").iterdir():
        assert set(pq.read_table(p).column("rank").to_pylist()) == {int(p.name.split("-")[1])}


class ForwardLM(TinyLM):
    """training_step goes through self(...), so a compiled LightningModule runs its compiled forward."""

    def forward(self, ids: Any) -> Any:
        return self.model(input_ids=ids, labels=ids).loss

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        (ids,) = batch
        return self(ids)


@pytest.mark.slow
def test_compiled_module_records_global_steps(tmp_path: Path) -> None:
    run = tmp_path / "run"
    cb = MoEScopeCallback(run, flush_every=2, alerts=False)
    torch._dynamo.reset()
    compiled = torch.compile(ForwardLM(tiny_mixtral()))
    try:
        trainer(tmp_path, max_steps=3, callbacks=[cb]).fit(compiled, loader(4))
    finally:
        torch._dynamo.reset()
    load = pq.read_table(run / "expert_load").to_pandas()
    assert sorted(load.step.unique()) == [0, 1, 2]  # trace steps = global steps
    assert (load.groupby(["step", "layer"]).tokens.sum() == BATCH * SEQ * K).all()  # tokens × k per layer
