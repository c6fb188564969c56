"""schemathesis hooks for the rerank-server API check.

With truncation "reject" (or TEI's truncate: false) a pair longer than the model's max_length is refused with 400
by design: whether a valid request fits depends on how its text tokenizes, which no schema can state. Such
requests are left out of the *positive* cases only; negative cases and every other check still run on them.
"""
import schemathesis
from schemathesis import GenerationMode


def _rejects_long_pairs(body):
    return isinstance(body, dict) and (body.get("truncation") == "reject" or body.get("truncate") is False)


@schemathesis.hook
def filter_case(context, case):
    meta = case.meta
    positive = meta is not None and meta.generation.mode == GenerationMode.POSITIVE
    return not (positive and _rejects_long_pairs(case.body))
