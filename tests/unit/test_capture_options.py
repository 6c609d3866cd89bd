"""The options of moescope.record are declared once (CaptureOptions) and every entry point takes exactly them."""

from __future__ import annotations

import inspect

import pytest

from moescope.capture.options import CaptureOptions


def test_build_sets_fields_and_suggests_the_nearest_name_for_a_typo() -> None:
    opts = CaptureOptions.build(tokens=0.5, run="r")
    assert (opts.tokens, opts.run, opts.flush_every) == (0.5, "r", 50)
    assert CaptureOptions.build(opts, seed=3).tokens == 0.5  # later values layer over earlier options
    with pytest.raises(TypeError, match="'tokns'.*did you mean 'tokens'"):
        CaptureOptions.build(tokns=0.5)


@pytest.mark.parametrize(
    ("field", "value"),
    [("tokens", 1.5), ("tokens", -0.1), ("flush_every", 0), ("on_full", "spill"), ("raise_on", "error"),
     ("max_queue_mb", 0), ("max_rows_per_flush", -1)],
)
def test_out_of_range_values_are_refused(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        CaptureOptions.build(**{field: value})


def test_no_entry_point_redeclares_an_option() -> None:
    torch = pytest.importorskip("torch")
    from moescope.capture.recorder import Recorder
    from moescope.integrations._base import RecordingSession

    entry_points = [Recorder.__init__, RecordingSession.__init__]
    try:
        from moescope.integrations.hf import MoEScopeTrainerCallback

        entry_points.append(MoEScopeTrainerCallback.__init__)
    except ImportError:  # transformers not installed
        pass
    try:
        from moescope.integrations.lightning import MoEScopeCallback

        entry_points.append(MoEScopeCallback.__init__)
    except ImportError:  # lightning not installed
        pass
    names = set(CaptureOptions.names())
    for fn in entry_points:
        params = inspect.signature(fn).parameters
        # Recorder keeps its two positional shortcuts record(model, path, tokens, flush_every) and nothing else.
        redeclared = (names & set(params)) - ({"tokens", "flush_every"} if fn is Recorder.__init__ else set())
        assert not redeclared, f"{fn.__qualname__} redeclares {sorted(redeclared)}"
        assert any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    model = torch.nn.Linear(2, 2)
    rec = Recorder(model, "unused-run", 0.25, 10, seed=7, on_full="drop")
    assert (rec.tokens, rec.flush_every, rec.seed, rec.on_full) == (0.25, 10, 7, "drop")
    with pytest.raises(TypeError, match="did you mean 'flush_every'"):
        Recorder(model, "unused-run", flush_evry=3)
    session = RecordingSession("unused-run", tokens=0.5, recorder_kwargs={"max_queue_mb": 8})
    assert (session.options.tokens, session.options.max_queue_mb) == (0.5, 8)
