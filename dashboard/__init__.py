"""moescope's Dash dashboard (a content folder, imported as the package `moescope_dashboard`).

This folder ships inside the wheel as `moescope/_content/dashboard` and sits at the top of a checkout;
`moescope.dashboard.package()` imports it under one fixed name from wherever it is, so pages and
tests write `from moescope_dashboard import data, figures, state` in both cases.

    app.py        create_app(trace_root): the Dash app (nav bar, page container, URL state callbacks)
    data.py       data functions: cached, read-only queries over a trace (no plotting)
    figures.py    figure functions: DataFrames in, plotly figures out (one expert palette)
    state.py      the selection (run, layer, steps) carried in the URL query string
    components.py shared layout pieces (selection bar, cards, tables, messages)
    synthetic.py  synthetic traces for tests and the latency benchmark
    pages/        one module per page, registered with dash.register_page (Dash's pages_folder)
"""
