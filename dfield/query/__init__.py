"""Queries: from a text, an image patch or a click on a training view to a query set in the teacher's space
(positives and automatic or text negatives), per-view relevance maps and masks, images and points of what was
selected, and scores against ground truth on generated scenes.

    from dfield.query import QuerySpec, make_query, relevance
    q = make_query("runs/toy", QuerySpec(patch=(3, 40, 40, 60, 60)))   # a box on training view 3
    maps = relevance("runs/toy", q)                                    # every training view
    maps[0].probability, maps[0].mask                                  # (H, W) each

Modules, bottom to top: sets (softmax maths, embeddings of boxes and clicks), spec (what a query asks, checks),
render_cache, clusters (automatic negatives), context (a run opened for querying), builder (make_query),
relevance, evaluation, outputs (run_query). May import errors, data, core, fields, models, config, io, features
and training; never edit or app.
"""

from dfield.errors import QueryError
from dfield.query.builder import make_query
from dfield.query.context import QueryContext, context
from dfield.query.outputs import run_query
from dfield.query.relevance import Relevance, relevance
from dfield.query.sets import QuerySet
from dfield.query.spec import QuerySpec

__all__ = ["QueryContext", "QueryError", "QuerySet", "QuerySpec", "Relevance", "context", "make_query", "relevance",
           "run_query"]
