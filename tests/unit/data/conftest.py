"""Fixtures for the data tests."""

import pytest
from s2d_data_rows import dapo_row


@pytest.fixture
def dapo_rows():
    return [dapo_row(i, f"What is {i} + {i}?", str(2 * i)) for i in range(5)]
