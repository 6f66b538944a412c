"""The abstract specification (DESIGN §5): the tensor-free cache and its abstraction function
(`abstract`), what every page must hold (`contents`), the model's own recency (`recency`), and
what each operation must achieve (`effects`). Nothing here trusts a value the cache computes."""

from .abstract import Allowed, Model, Page, abstract, check_evict, check_evict_host, frame, node_prefix, same_data

__all__ = ["Allowed", "Model", "Page", "abstract", "check_evict", "check_evict_host", "frame", "node_prefix", "same_data"]
