"""The POST body's parsing: the quick pass for plainly valid bodies decides exactly as the full schema check does."""
from __future__ import annotations

import hashlib
from typing import Any, Optional, Tuple

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from pacifica.cartd import cartrequest
from pacifica.cartd.cartrequest import CartRequest, parse_cart_request
from pacifica.cartd.errors import BadRequest

SHA1 = hashlib.sha1(b'x').hexdigest()
ODD_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=False, width=16),
                       st.text(max_size=6), st.sampled_from(['sha1', 'MD5', SHA1, SHA1.upper(), ' ' + SHA1, '/a', 'a/b']),
                       st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=2), st.integers(), max_size=2))
ENTRY_VALUES = {'id': st.one_of(st.integers(0, 10**6), st.text(max_size=8), ODD_VALUES),
                'path': st.one_of(st.sampled_from(['a', '/b', 'c/d', 'é/f', 'a/../b', '', 'x' * 300]), ODD_VALUES),
                'hashtype': st.one_of(st.sampled_from(['sha1', 'SHA1', 'md5', 'nope']), ODD_VALUES),
                'hashsum': st.one_of(st.sampled_from([SHA1, SHA1.upper(), hashlib.md5(b'').hexdigest()]), ODD_VALUES)}
ENTRIES = st.fixed_dictionaries({}, optional=ENTRY_VALUES) | ODD_VALUES
BODIES = st.one_of(st.fixed_dictionaries({'fileids': st.lists(ENTRIES, max_size=4)},
                                         optional={'bundle': st.one_of(st.booleans(), ODD_VALUES)}), ODD_VALUES)


def _outcome(body: Any) -> Tuple[Optional[CartRequest], Optional[str]]:
    try:
        return parse_cart_request(body), None
    except BadRequest as exc:
        return None, exc.message


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=BODIES)
def test_the_quick_pass_decides_as_the_schema_does(body: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    quick = _outcome(body)
    with monkeypatch.context() as patched:
        patched.setattr(cartrequest, '_plainly_follows_schema', lambda _body: False)
        full = _outcome(body)
    assert quick == full


def test_a_plain_body_skips_the_schema_validator(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(_body: Any) -> Any:
        raise AssertionError('the schema validator ran on a plainly valid body')

    monkeypatch.setattr(cartrequest, '_VALIDATOR', type('Refusing', (), {'iter_errors': staticmethod(refuse)})())
    request = parse_cart_request({'fileids': [{'id': 7, 'path': '/a/b', 'hashtype': 'SHA1', 'hashsum': SHA1.upper()}],
                                  'bundle': True})
    assert request.bundle is True
    assert request.files == (cartrequest.FileRequest('7', 'a/b', 'sha1', SHA1),)


@pytest.mark.parametrize('body, fragment', [
    ({'fileids': [{'id': True, 'path': 'a', 'hashtype': 'sha1', 'hashsum': SHA1}]}, "fileids[0].id: True is not of type"),
    ({'fileids': [{'id': 1, 'path': 'a', 'hashtype': 'sha1'}]}, "'hashsum' is a required property"),
    ({'fileids': [], 'bundle': 'yes'}, "bundle: 'yes' is not of type 'boolean'"),
])
def test_bodies_off_the_quick_pass_get_the_schemas_words(body: Any, fragment: str) -> None:
    with pytest.raises(BadRequest) as caught:
        parse_cart_request(body)
    assert fragment in caught.value.message


def test_a_float_id_the_schema_takes_is_taken() -> None:
    assert parse_cart_request({'fileids': [{'id': 1.0, 'path': 'a', 'hashtype': 'sha1', 'hashsum': SHA1}]}).files[0] \
        .archive_id == '1.0'
