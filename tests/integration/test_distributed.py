"""Under torch.distributed each rank writes its own parts (reduce="none"); their union equals a one-process recording."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import duckdb
import pytest

pytest.importorskip("torch")

WORKER = textwrap.dedent(
    """
    import os, sys, torch, torch.distributed as dist, moescope
    sys.path.insert(0, {tests!r})
    from toy_moe import ToyMoE
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    mode = {mode!r}
    torch.manual_seed(0)
    # "fsdp": FSDP2 shards of a model whose blocks are activation-checkpointed, trained (forward + backward);
    # "train": the same model in one process, neither sharded nor checkpointed
    m = ToyMoE(dense=True, checkpoint="non_reentrant" if mode == "fsdp" else None) if mode != "infer" else ToyMoE()
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard
        for b in m.blocks:
            fully_shard(b)
        fully_shard(m)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 64, (4, 6), generator=g) for _ in range(5)]
    with moescope.record(m, {out!r}, tokens=1.0, flush_every=2, **{kw!r}) as rec:
        for step, x in enumerate(batches):
            rec.step = step
            y = m(x[rank::world])  # data parallel: each rank sees its shard of the global batch
            if mode != "infer":
                y.pow(2).mean().backward()
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    """
)


def _run(out: Path, world: int, port: int, mode: str = "infer", **kw: str) -> None:
    script = WORKER.format(tests=str(Path(__file__).resolve().parents[1]), out=str(out), mode=mode, kw=kw)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world)}
    procs = [
        subprocess.Popen([sys.executable, "-c", script], env={**env, "RANK": str(r)}, stderr=subprocess.PIPE, text=True)
        for r in range(world)
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]


@pytest.mark.dist
def test_two_ranks_union_equals_one_process(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _run(tmp_path / "single" / "run", 1, port)
    _run(tmp_path / "ddp" / "run", 2, port, reduce="none")  # per-rank parts (the default sums them: test_reduce)
    parts = sorted(p.name for p in (tmp_path / "ddp" / "run" / "expert_load").glob("*.parquet"))
    assert {p.split("-")[1] for p in parts} == {"0", "1"}
    assert (tmp_path / "ddp" / "run" / "manifest.json").exists()
    assert (tmp_path / "ddp" / "run" / "manifest.rank-1.json").exists()

    def load(root: Path) -> list[tuple]:
        return duckdb.sql(
            f"SELECT step, layer, expert, sum(tokens), sum(prob_sum) FROM '{root}/run/expert_load/*.parquet' "
            "GROUP BY ALL ORDER BY ALL"
        ).fetchall()

    def rows(root: Path) -> list[tuple]:
        return duckdb.sql(
            f"SELECT step, layer, pos, token_id, experts, weights "
            f"FROM '{root}/run/routing/*.parquet' ORDER BY ALL"
        ).fetchall()

    a, b = load(tmp_path / "ddp"), load(tmp_path / "single")
    assert [r[:4] for r in a] == [r[:4] for r in b]  # assignments are exact
    # router-prob sums differ only by float32 summation order across the two batch shapes
    assert all(abs(x[4] - y[4]) < 1e-5 for x, y in zip(a, b))
    ra, rb = rows(tmp_path / "ddp"), rows(tmp_path / "single")
    assert [r[:5] for r in ra] == [r[:5] for r in rb]
    assert all(abs(u - v) < 1e-5 for x, y in zip(ra, rb) for u, v in zip(x[5], y[5]))
    assert duckdb.sql(f"SELECT DISTINCT rank FROM '{tmp_path}/ddp/run/routing/*.parquet' ORDER BY 1").fetchall() == [
        (0,),
        (1,),
    ]


@pytest.mark.dist
def test_fsdp2_with_checkpointing_records_each_forward_once(tmp_path: Path) -> None:
    """FSDP2 + non-reentrant activation checkpointing: the ranks' union equals one plain process, not twice it."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _run(tmp_path / "single" / "run", 1, port, "train")
    _run(tmp_path / "fsdp" / "run", 2, port, "fsdp")

    def load(root: Path) -> list[tuple]:
        return duckdb.sql(
            f"SELECT step, layer, expert, sum(tokens), sum(prob_sum) FROM '{root}/run/expert_load/*.parquet' "
            "GROUP BY ALL ORDER BY ALL"
        ).fetchall()

    a, b = load(tmp_path / "fsdp"), load(tmp_path / "single")
    assert [r[:4] for r in a] == [r[:4] for r in b]
    assert all(abs(x[4] - y[4]) < 1e-5 for x, y in zip(a, b))
    per_step = duckdb.sql(f"SELECT DISTINCT sum(tokens) FROM '{tmp_path}/fsdp/run/expert_load/*.parquet' "
                          "GROUP BY step, layer").fetchall()
    assert per_step == [(4 * 6 * 2,)]  # the global batch's tokens × top-2, once
    n_rows = duckdb.sql(f"SELECT count(*) FROM '{tmp_path}/fsdp/run/routing/*.parquet'").fetchall()
    assert n_rows == [(5 * 2 * 4 * 6,)]
