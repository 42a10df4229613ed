import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(scope="session")
def rank_pool():
    from rank_pool import RankPool

    pool = RankPool(8)
    yield pool
    pool.close()
