"""The report: plain data, its JSON codec, and the renderings of it.

Data (computes nothing; no import of a computing stage)::

    model.py           Report, Row, Metrics, SampleStats, Coverage, Fidelity, Status labels
    codec.py           JSON encode/decode by field type (non-finite floats as strings)
    tree.py            rows -> module tree with the worst error per subtree

Renderers (import the data above and summary.py's shared wording; html.py draws with svg.py)::

    summary.py         numbers, shapes, tolerances and the one-line verdict, as text
    text.py            terminal table and tree (rich), fitted to the terminal width
    html.py, svg.py    one self-contained HTML page (templates/ holds its CSS and script)
    model_explorer.py  node data JSON for Google's Model Explorer

The public names are exported from :mod:`fxalign`; import the modules above for the rest.
"""

__all__: list[str] = []
