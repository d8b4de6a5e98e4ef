"""Statements in PostgreSQL's own placeholder syntax, converted once."""

from __future__ import annotations

import pytest

from celery_causal.sql.engine import native_placeholders


def test_each_name_becomes_one_numbered_parameter_in_order_of_first_use() -> None:
    sql = "SELECT %(b_scope)s, %(b_id)s WHERE scope = %(b_scope)s AND x LIKE 'a%%'"

    converted, names = native_placeholders(sql)

    assert converted == b"SELECT $1, $2 WHERE scope = $1 AND x LIKE 'a%'"
    assert names == ("b_scope", "b_id")


def test_a_placeholder_it_cannot_convert_is_refused() -> None:
    with pytest.raises(ValueError, match="unsupported placeholder"):
        native_placeholders("SELECT %s")
