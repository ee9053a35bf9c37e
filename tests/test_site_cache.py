"""Prepared sites are kept in a least-recently-used cache bounded by the bytes of their arrays (``data-cache-mb``):
one simulation worker that serves many sites keeps the ones it used last, and prepares an evicted one again, with
the same pairs, when a message for it comes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from client.paired import paired_for
from client.pairs import PREPARED_SITES, PreparedSite, PreparedSites, default_cache_bytes, set_data_cache_limit
from simulation.phantoms import write_phantom_sites

SCALE = 2


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    sites = write_phantom_sites(tmp_path_factory.mktemp("cache"), n_sites=3, subjects_per_site=3, shape=(32, 32, 16))
    return [str(site) for site in sites]


def _pairs(site: PreparedSite) -> list:
    return [*site.train, *site.val, *site.test]


def _array_bytes(site: PreparedSite) -> int:
    """Counted independently of :attr:`PreparedSite.nbytes`: the arrays a ScanPair holds."""
    return sum(pair.hr.nbytes + pair.lr.nbytes + pair.affine.nbytes for pair in _pairs(site))


def test_least_recently_used_sites_are_let_go_past_the_limit_and_prepared_again_the_same(folders: list[str]) -> None:
    a, b, c = folders
    pairing = paired_for(2)
    cache = PreparedSites(limit_bytes=2**40)
    first = {folder: cache.get(folder, SCALE, pairing) for folder in folders}
    assert [key[0] for key in cache.held()] == [a, b, c]
    sizes = {folder: _array_bytes(site) for folder, site in first.items()}
    assert all(site.nbytes == sizes[folder] > 0 for folder, site in first.items())
    assert cache.total_bytes == sum(sizes.values())

    cache.set_limit(sizes[b] + sizes[c])  # room for two: the least recently used, A, goes
    assert [key[0] for key in cache.held()] == [b, c] and cache.total_bytes == sizes[b] + sizes[c]
    assert cache.get(b, SCALE, pairing) is first[b]  # kept: no new preparation, and now the most recent

    again = cache.get(a, SCALE, pairing)  # prepared again; C, now the least recently used, goes
    assert [key[0] for key in cache.held()] == [b, a]
    assert again is not first[a] and again.name == first[a].name
    for old, new in zip(_pairs(first[a]), _pairs(again), strict=True):
        assert old.subject == new.subject
        np.testing.assert_array_equal(new.hr, old.hr)
        np.testing.assert_array_equal(new.lr, old.lr)  # the same seeded noise

    cache.set_limit(1)  # a site over the limit alone is kept while it is the one in use
    assert [key[0] for key in cache.held()] == [a]


def test_data_cache_mb_from_the_node_config_sets_the_limit() -> None:
    try:
        set_data_cache_limit({"data-cache-mb": 100_000})
        assert PREPARED_SITES.limit_bytes == 100_000 * 2**20
        for bad in (0, -5, "lots", True, float("inf")):
            with pytest.raises(ValueError, match="data-cache-mb"):
                set_data_cache_limit({"data-cache-mb": bad})
    finally:
        set_data_cache_limit({})
    assert PREPARED_SITES.limit_bytes == default_cache_bytes() > 2**20
