"""Personalization methods, registered by name and imported lazily."""

from prefsteer.methods.base import (Method, MethodOutput, NotFittedError, OptionError, UnknownOptionError,
                                    available_methods, config_from_options, get_method_class, register_method)

# Built-in methods; each module registers itself under the same name when imported.
for _name, _target in {
    "none": "prefsteer.methods.plain:Plain",
    "exact": "prefsteer.methods.exact:Exact",
    "exact-global": "prefsteer.methods.exact:ExactGlobal",
    "base": "prefsteer.methods.history:BasePrompt",
    "cliper": "prefsteer.methods.cliper:Cliper",
    "drift": "prefsteer.methods.drift:Drift",
    "reward": "prefsteer.methods.reward:Reward",
}.items():
    register_method(_name, _target)

__all__ = ["Method", "MethodOutput", "NotFittedError", "OptionError", "UnknownOptionError", "available_methods",
           "config_from_options", "get_method_class", "register_method"]
