"""The legend of the terms the demo and `moescope report` print (one text, printed by both)."""

from __future__ import annotations

#: What each metric name in a finding means, in a person's words, with the limits of the default rules.
TERMS: tuple[tuple[str, str], ...] = (
    ("N·f", "utilization: an expert's share f of a layer's assignments times the number of experts N; "
            "1 = fair share, below 0.05 = dead expert"),
    ("MaxVio", "busiest expert's load / mean load - 1; 0 = even, above 1 WARN, above 3 FAIL"),
    ("CV", "coefficient of variation of the experts' loads, std / mean; above 0.5 WARN"),
    ("top-m share", "share of assignments carried by the m = max(k, N/4) busiest experts; 90% or more = collapse"),
    ("JS", "Jensen-Shannon distance (base 2, 0..1) between two expert-load distributions; drift above 0.1 "
           "and above a bootstrap threshold fitted on the baseline"),
    ("TV", "total variation distance: half the summed absolute difference of two load distributions"),
    ("overlap", "subspace overlap of two experts' weights (1 = same subspace); with CKA, above 0.8 = clones"),
)


def legend(width: int = 12, columns: int = 110) -> str:
    """The legend as text: a heading line, then 'term  meaning' per term, wrapped at `columns`."""
    import textwrap

    lines = ["terms:"]
    for term, text in TERMS:
        head = f"  {term:<{width}} "
        lines.append(textwrap.fill(text, width=columns, initial_indent=head, subsequent_indent=" " * len(head)))
    return "\n".join(lines) + "\n"


LEGEND = legend()
