"""CLIPer's guidance step, as the method uses it: re-exported from the guide kind ``cliper``.

    p(y_i | y_<i, x, c) ∝ p(y_i | y_<i, x) · p(c | y_<=i, x)^α

The step itself (`guided_logits`, `CliperGuide` and its description as data, `check_description`)
lives in `prefsteer.backends.guides.cliper`, beside the engines that run it: vLLM's engine process
rebuilds a guide from its description there without importing any method.
"""

from prefsteer.backends.guides.cliper import (GUIDE_FORMAT, CliperGuide, check_alpha, check_description,
                                              check_top_k, guided_logits, preference_logp)

__all__ = ["GUIDE_FORMAT", "CliperGuide", "check_alpha", "check_description", "check_top_k", "guided_logits",
           "preference_logp"]
