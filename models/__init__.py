"""The abstract, tensor-free model of the cache (DESIGN §5) and its abstraction function."""

from .abstract import Allowed, Model, Page, abstract, check_evict, check_evict_host, frame, node_prefix, same_data

__all__ = ["Allowed", "Model", "Page", "abstract", "check_evict", "check_evict_host", "frame", "node_prefix", "same_data"]
