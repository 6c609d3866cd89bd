"""The `quick` marker: every test under tests/unit that is not slow, browser, dist, gpu or hf, so
`python -m pytest -m quick` is the developer loop (hand-built traces, no training runs, no extra processes)."""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).parent
#: Markers that keep a unit test out of the quick loop.
NOT_QUICK = ("slow", "browser", "dist", "gpu", "hf")
#: Unit tests measured at 2 s or more each (2 CPU cores, 2026-11-29): they run in CI, not in the quick loop.
#: Their owners may mark them `slow` in place; a name here that no longer exists is simply not matched.
LONG = frozenset({
    "test_watch_while_a_process_writes", "test_bad_arguments_are_one_line", "test_help_lists_watch",
    "test_once_on_sample_traces", "test_once_on_a_hand_built_trace", "test_refresh_and_query_while_a_thread_writes",
    "test_time_limit_stops_a_cross_join_bomb_and_a_long_plan", "test_false_alarm_rate_under_the_null",
    "test_planted_shift_found_in_that_layer_only", "test_check_and_report_on_snapshot_only_and_alerts",
    "test_config_file_and_default_lookup", "test_systems_page_renders", "test_cli_whatif", "test_cli_refresh_flag",
    "test_regressions_against_reference", "test_sample_traces_render_every_page_for_every_run",
    "test_counts_only_trace_pages_say_what_is_missing", "test_model_dispatch_modes_agree",
    "test_queries_beyond_the_concurrency_cap_wait_for_a_slot_or_get_one_line", "test_typod_tags_are_usage_errors",
    "test_shift_flagged_against_reference", "test_visitors_are_isolated_and_not_blocked",
    "test_shipped_classes_exist_in_transformers",  # imports transformers: seconds before the test starts
    "test_sample_shift_flagged_against_baseline", "test_regressions_is_a_function_of_connections_and_selections",
    "test_config_object_and_reference",
    # layout rules over the import graph (and importing every room): checked in CI
    "test_trace_reading_rooms_never_import_torch", "test_the_old_cycles_stay_broken_even_lazily",
    "test_room_imports",
})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark the unit tests that belong to the quick loop."""
    for item in items:
        if HERE not in Path(str(item.fspath)).parents or item.originalname in LONG:
            continue
        if not any(item.get_closest_marker(m) for m in NOT_QUICK):
            item.add_marker(pytest.mark.quick)
