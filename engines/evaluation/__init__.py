"""Evaluation of synthetic CT against reference CT: the metrics of the sCT literature and a non-learned baseline.

Definitions follow the sCT literature (docs/model.md, Metric definitions); every mask states how it was made,
because the literature's numbers are only comparable when the mask definition is reported alongside them.
"""
