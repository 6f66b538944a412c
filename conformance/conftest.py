"""Registers the `conformance` marker (pytest runs with --strict-markers)."""


def pytest_configure(config):
    config.addinivalue_line("markers", "conformance: the conformance machines against refcache and SGLang's caches "
                                       "(SGLang targets skip unless `python -m conformance.install` has run)")
