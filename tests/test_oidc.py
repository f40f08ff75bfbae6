"""OidcVerifier against a real local HTTPS issuer: every refusal, key caching, concurrency."""
from __future__ import annotations

import base64
import hashlib
import json
import logging
import time
import urllib.request

import gevent
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from devastator.oidc import OidcIdentity, OidcVerifier, user_id_for
from devastator.protocol import is_valid_user_id
from devastator.protocol.errors import Forbidden, Overloaded
from oidc_issuer import OidcIssuer, oidc_issuer, public_pem, sign  # noqa: F401

SUBJECT = "1234567890"


class FakeClock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def make_verifier(oidc_issuer, clock):
    def make(**changes) -> OidcVerifier:
        kwargs = {
            "issuers": [oidc_issuer.issuer],
            "audiences": [oidc_issuer.audience],
            "jwks_url": oidc_issuer.jwks_url,
            "ssl_context": oidc_issuer.ssl_context(),
            "clock": clock,
            "fetch_timeout": 5.0,
        }
        kwargs.update(changes)
        return OidcVerifier(**kwargs)

    return make


@pytest.fixture
def verifier(make_verifier) -> OidcVerifier:
    return make_verifier()


def refused(verifier: OidcVerifier, token, cause: str) -> None:
    with pytest.raises(Forbidden) as info:
        verifier.verify(token)
    assert info.value.message == cause


def overloaded(verifier: OidcVerifier, token: str) -> None:
    with pytest.raises(Overloaded) as info:
        verifier.verify(token)
    assert info.value.message == "identity provider key set unavailable, retry later"


def verify_or_refusal(verifier: OidcVerifier, token: str) -> OidcIdentity | Forbidden:
    """For greenlets: a refusal as a value, as gevent prints every failed greenlet."""
    try:
        return verifier.verify(token)
    except Forbidden as refusal:
        return refusal


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


# Valid tokens and what the constructor does not do


def test_valid_token_gives_identity(oidc_issuer, verifier):
    identity = verifier.verify(oidc_issuer.mint())
    assert identity == OidcIdentity(issuer=oidc_issuer.issuer, subject=SUBJECT, email="user@example.com")
    verifier.verify(oidc_issuer.mint("other"))
    assert oidc_issuer.fetches == 1


def test_token_without_email_claim_but_verified_gives_no_email(oidc_issuer, verifier):
    assert verifier.verify(oidc_issuer.mint(email=None)).email is None


def test_constructor_fetches_nothing(oidc_issuer, make_verifier):
    make_verifier()
    assert oidc_issuer.fetches == 0


def test_constructor_refuses_plain_http_and_bare_strings(oidc_issuer):
    with pytest.raises(ValueError):
        OidcVerifier(issuers=["x"], audiences=["y"], jwks_url="http://127.0.0.1/jwks")
    with pytest.raises(TypeError):
        OidcVerifier(issuers="x", audiences=["y"], jwks_url=oidc_issuer.jwks_url)


def test_discovery_document_names_issuer_and_jwks(oidc_issuer):
    url = f"{oidc_issuer.issuer}/.well-known/openid-configuration"
    with urllib.request.urlopen(url, context=oidc_issuer.ssl_context(), timeout=5) as response:
        document = json.load(response)
    assert document["issuer"] == oidc_issuer.issuer
    assert document["jwks_uri"] == oidc_issuer.jwks_url


# Signatures, keys and algorithms


def test_signature_by_another_key_under_a_published_kid_is_refused(oidc_issuer, verifier):
    foreign = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    refused(verifier, oidc_issuer.mint(key=foreign), "ID token signature invalid")


def test_tampered_payload_is_refused(oidc_issuer, verifier):
    header, _, signature = oidc_issuer.mint().split(".")
    payload = b64(json.dumps({"iss": oidc_issuer.issuer, "sub": "admin"}).encode())
    refused(verifier, f"{header}.{payload}.{signature}", "ID token signature invalid")


def test_alg_none_is_refused(oidc_issuer, verifier):
    refused(verifier, oidc_issuer.mint(alg="none"), "ID token algorithm not allowed")
    refused(verifier, oidc_issuer.mint(alg="none", header={"alg": "None"}), "ID token algorithm not allowed")
    refused(verifier, oidc_issuer.mint(header={"alg": None}), "ID token algorithm not allowed")


def test_hs256_keyed_with_the_public_key_is_refused(oidc_issuer, verifier):
    pem = public_pem(oidc_issuer.current_key)
    refused(verifier, oidc_issuer.mint(alg="HS256", key=pem), "ID token algorithm not allowed")
    refused(verifier, oidc_issuer.mint(alg="HS512", key=pem), "ID token algorithm not allowed")
    assert oidc_issuer.fetches == 0  # refused before any key is looked up


def test_header_alg_must_match_the_key(oidc_issuer, verifier):
    # The issuer's JWKs say RS256: another RSA algorithm is refused, even if it verified.
    refused(verifier, oidc_issuer.mint(alg="PS256"), "ID token algorithm not allowed")
    refused(verifier, oidc_issuer.mint(header={"alg": "RS512"}), "ID token algorithm not allowed")
    refused(verifier, oidc_issuer.mint(header={"alg": "ES256"}), "ID token algorithm not allowed")


def test_rsa_key_without_alg_allows_every_rsa_algorithm(oidc_issuer, verifier):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    oidc_issuer.extra_jwks.append(OidcIssuer.public_jwk(key, "no-alg", alg=None))
    for alg in ("RS256", "RS512", "PS256", "PS384"):
        assert verifier.verify(oidc_issuer.mint(key=key, kid="no-alg", alg=alg)).subject == SUBJECT
    ec_key = ec.generate_private_key(ec.SECP256R1())
    refused(verifier, oidc_issuer.mint(key=ec_key, kid="no-alg"), "ID token algorithm not allowed")


@pytest.mark.parametrize("curve", [ec.SECP256R1(), ec.SECP384R1(), ec.SECP521R1()], ids=lambda c: c.name)
def test_ec_keys_verify_their_curve_algorithm(oidc_issuer, verifier, curve):
    key = ec.generate_private_key(curve)
    oidc_issuer.extra_jwks.append(OidcIssuer.public_jwk(key, "ec", alg=None))
    assert verifier.verify(oidc_issuer.mint(key=key, kid="ec")).subject == SUBJECT


def test_ec_key_with_mismatched_alg_is_not_used(oidc_issuer, verifier):
    key = ec.generate_private_key(ec.SECP256R1())
    oidc_issuer.extra_jwks.append(OidcIssuer.public_jwk(key, "ec", alg="ES384"))
    refused(verifier, oidc_issuer.mint(key=key, kid="ec"), "ID token signed with an unknown key")


def test_oct_keys_are_never_used(oidc_issuer, verifier):
    secret = b"0123456789abcdef0123456789abcdef"
    oidc_issuer.extra_jwks.append({"kty": "oct", "kid": "oct", "k": b64(secret), "alg": "HS256"})
    oidc_issuer.extra_jwks.append({"kty": "oct", "kid": "oct-no-alg", "k": b64(secret)})
    refused(verifier, oidc_issuer.mint(kid="oct", alg="HS256", key=secret), "ID token algorithm not allowed")
    refused(verifier, oidc_issuer.mint(kid="oct"), "ID token signed with an unknown key")
    refused(verifier, oidc_issuer.mint(kid="oct-no-alg"), "ID token signed with an unknown key")
    assert verifier.verify(oidc_issuer.mint()).subject == SUBJECT


def test_keys_not_for_signing_or_with_private_parts_or_short_are_not_used(oidc_issuer, verifier):
    key = oidc_issuer.current_key
    private_jwk = OidcIssuer.public_jwk(key, "private")
    private_jwk["d"] = b64(key.private_numbers().d.to_bytes(256, "big"))
    short = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    oidc_issuer.extra_jwks += [
        OidcIssuer.public_jwk(key, "enc", use="enc"),
        private_jwk,
        OidcIssuer.public_jwk(short, "short"),
        {"kty": "OKP", "kid": "okp", "crv": "Ed25519", "x": b64(bytes(32))},
        {"kty": "RSA", "kid": "broken", "n": "!!", "e": "AQAB"},
        "not a key",
    ]
    for kid in ("enc", "private", "okp", "broken"):
        refused(verifier, oidc_issuer.mint(kid=kid), "ID token signed with an unknown key")
    refused(verifier, oidc_issuer.mint(kid="short", key=short), "ID token signed with an unknown key")
    assert verifier.verify(oidc_issuer.mint()).subject == SUBJECT


@pytest.mark.parametrize(
    "token",
    ["", "abc", "a.b.c", "a.b", "....", 12345, None],
    ids=["empty", "one-part", "garbage", "two-parts", "dots", "int", "none"],
)
def test_malformed_tokens_are_refused(verifier, token):
    refused(verifier, token, "ID token malformed")


def test_signed_payloads_that_are_not_claims_are_malformed(oidc_issuer, verifier):
    header = {"alg": "RS256", "kid": oidc_issuer.current_kid}
    for payload in (b"not json", b"[1, 2]"):
        token = sign(header, payload, "RS256", oidc_issuer.current_key)
        refused(verifier, token, "ID token malformed")


def test_kid_missing_or_not_a_string(oidc_issuer, verifier):
    refused(verifier, oidc_issuer.mint(kid=None), "ID token signed with an unknown key")
    refused(verifier, oidc_issuer.mint(kid=7), "ID token malformed")


# Claims


def test_wrong_issuer_is_refused(oidc_issuer, verifier):
    refused(verifier, oidc_issuer.mint(iss="https://accounts.example.com"), "ID token has the wrong issuer")
    refused(verifier, oidc_issuer.mint(iss=None), "ID token has the wrong issuer")
    refused(verifier, oidc_issuer.mint(iss=[oidc_issuer.issuer]), "ID token has the wrong issuer")


@pytest.mark.parametrize("aud", ["other-client", ["other-client"], [], 42, [42], None])
def test_wrong_audience_is_refused(oidc_issuer, verifier, aud):
    refused(verifier, oidc_issuer.mint(aud=aud), "ID token has the wrong audience")


def test_multiple_audiences_need_azp_among_ours(oidc_issuer, make_verifier):
    ours, second = oidc_issuer.audience, "second-client.apps.googleusercontent.com"
    verifier = make_verifier(audiences=[ours, second])
    assert verifier.verify(oidc_issuer.mint(aud=[ours, "third"], azp=ours)).subject == SUBJECT
    assert verifier.verify(oidc_issuer.mint(aud=["third", second], azp=second)).subject == SUBJECT
    refused(verifier, oidc_issuer.mint(aud=[ours, "third"], azp=None), "ID token has the wrong authorized party")
    refused(verifier, oidc_issuer.mint(aud=[ours, "third"], azp="third"), "ID token has the wrong authorized party")
    # One audience: azp may name another client of the same project (Android apps do).
    assert verifier.verify(oidc_issuer.mint(aud=[second], azp=None)).subject == SUBJECT
    assert verifier.verify(oidc_issuer.mint(aud=ours, azp="android-client")).subject == SUBJECT


def test_expired_token_is_refused_beyond_the_clock_skew(oidc_issuer, verifier, clock):
    now = clock.now
    assert verifier.verify(oidc_issuer.mint(now=now - 3600, exp=now - 59)).subject == SUBJECT
    refused(verifier, oidc_issuer.mint(now=now - 3600, exp=now - 61), "ID token expired")
    clock.now += 3600 + 61
    refused(verifier, oidc_issuer.mint(now=now), "ID token expired")


def test_token_issued_in_the_future_is_refused_beyond_the_clock_skew(oidc_issuer, verifier, clock):
    assert verifier.verify(oidc_issuer.mint(now=clock.now + 59)).subject == SUBJECT
    refused(verifier, oidc_issuer.mint(now=clock.now + 61), "ID token issued in the future")


def test_not_before_in_the_future_is_refused(oidc_issuer, verifier, clock):
    assert verifier.verify(oidc_issuer.mint(nbf=clock.now + 59)).subject == SUBJECT
    refused(verifier, oidc_issuer.mint(nbf=clock.now + 61), "ID token not yet valid")


@pytest.mark.parametrize("claim", ["exp", "iat"])
@pytest.mark.parametrize(
    "value", [None, "1700000000", True, float("nan"), float("inf")], ids=["absent", "string", "bool", "nan", "inf"]
)
def test_exp_and_iat_are_required_numbers(oidc_issuer, verifier, claim, value):
    refused(verifier, oidc_issuer.mint(**{claim: value}), "ID token malformed")


@pytest.mark.parametrize("verified", [False, "false", None, "True", 1, "yes"])
def test_unverified_email_is_refused(oidc_issuer, verifier, verified):
    refused(verifier, oidc_issuer.mint(email_verified=verified), "ID token email not verified")


def test_email_verified_as_string_true_is_accepted(oidc_issuer, verifier):
    assert verifier.verify(oidc_issuer.mint(email_verified="true")).email == "user@example.com"


def test_email_of_another_type_is_malformed(oidc_issuer, verifier):
    refused(verifier, oidc_issuer.mint(email=["a@example.com"]), "ID token malformed")


@pytest.mark.parametrize("sub", ["", "x" * 256, 1234567890, ["a"]], ids=["empty", "256-chars", "int", "list"])
def test_invalid_subject_is_refused(oidc_issuer, verifier, sub):
    refused(verifier, oidc_issuer.mint(sub=sub), "ID token has no valid subject")


def test_missing_subject_is_refused_and_long_one_accepted(oidc_issuer, verifier):
    refused(verifier, oidc_issuer.mint(sub=None), "ID token has no valid subject")
    assert verifier.verify(oidc_issuer.mint("x" * 255)).subject == "x" * 255


def test_refusal_texts_carry_no_token_data(oidc_issuer, verifier):
    token = oidc_issuer.mint(sub="secret-subject", iss="https://secret-issuer.example")
    with pytest.raises(Forbidden) as info:
        verifier.verify(token)
    assert "secret" not in str(info.value) and info.value.data is None


# The key set: fetching, caching, refreshing


def test_unknown_kid_refetches_at_most_once_per_interval(oidc_issuer, verifier, clock):
    verifier.verify(oidc_issuer.mint())
    assert oidc_issuer.fetches == 1
    # The keys were fetched just now: a kid they lack is no reason to ask again.
    refused(verifier, oidc_issuer.mint(kid="made-up"), "ID token signed with an unknown key")
    assert oidc_issuer.fetches == 1
    clock.now += 10
    for n in range(20):
        refused(verifier, oidc_issuer.mint(kid=f"made-up-{n}"), "ID token signed with an unknown key")
    assert oidc_issuer.fetches == 2
    clock.now += 9.9
    refused(verifier, oidc_issuer.mint(kid="made-up-again"), "ID token signed with an unknown key")
    assert oidc_issuer.fetches == 2
    clock.now += 0.1
    refused(verifier, oidc_issuer.mint(kid="made-up-later"), "ID token signed with an unknown key")
    assert oidc_issuer.fetches == 3
    # Known keys keep working without fetches in between.
    verifier.verify(oidc_issuer.mint())
    assert oidc_issuer.fetches == 3


def test_clock_stepped_back_does_not_hold_refetches_off(oidc_issuer, verifier, clock):
    verifier.verify(oidc_issuer.mint())
    clock.now -= 3600
    refused(verifier, oidc_issuer.mint(kid="made-up"), "ID token signed with an unknown key")
    assert oidc_issuer.fetches == 2


def test_first_token_with_unknown_kid_costs_one_fetch(oidc_issuer, verifier):
    refused(verifier, oidc_issuer.mint(kid="made-up"), "ID token signed with an unknown key")
    verifier.verify(oidc_issuer.mint())
    assert oidc_issuer.fetches == 1


def test_rotation_new_kid_accepted_after_one_refetch(oidc_issuer, verifier, clock):
    old_token = oidc_issuer.mint()
    verifier.verify(old_token)
    oidc_issuer.rotate()
    new_token = oidc_issuer.mint()
    clock.now += 10
    assert verifier.verify(new_token).subject == SUBJECT
    assert oidc_issuer.fetches == 2
    verifier.verify(old_token)
    verifier.verify(new_token)
    assert oidc_issuer.fetches == 2

    # The provider retires the old keys: once refetched, they are gone.
    oidc_issuer.rotate(keep_old=False)
    clock.now += 10
    assert verifier.verify(oidc_issuer.mint(now=clock.now)).subject == SUBJECT
    assert oidc_issuer.fetches == 3
    refused(verifier, old_token, "ID token signed with an unknown key")
    refused(verifier, new_token, "ID token signed with an unknown key")


def test_unreachable_key_set_without_cache_is_overloaded(oidc_issuer, verifier, caplog):
    token = oidc_issuer.mint()
    oidc_issuer.stop()
    with caplog.at_level(logging.WARNING, logger="devastator.oidc"):
        overloaded(verifier, token)
    [record] = caplog.records
    assert oidc_issuer.jwks_url in record.getMessage()


def test_failing_key_set_is_retried_only_after_the_interval(oidc_issuer, verifier, clock, caplog):
    oidc_issuer.jwks_status = 503
    token = oidc_issuer.mint()
    with caplog.at_level(logging.WARNING, logger="devastator.oidc"):
        overloaded(verifier, token)
        overloaded(verifier, token)
    assert oidc_issuer.fetches == 1
    assert len(caplog.records) == 1 and "503" in caplog.records[0].getMessage()
    oidc_issuer.jwks_status = 200
    clock.now += 10
    assert verifier.verify(token).subject == SUBJECT
    assert oidc_issuer.fetches == 2


def test_untrusted_tls_certificate_is_overloaded(oidc_issuer, make_verifier, caplog):
    verifier = make_verifier(ssl_context=None)  # system CAs do not know the test CA
    with caplog.at_level(logging.WARNING, logger="devastator.oidc"):
        overloaded(verifier, oidc_issuer.mint())
    assert "CERTIFICATE_VERIFY_FAILED" in caplog.records[0].getMessage()


@pytest.mark.parametrize(
    "document",
    [b"not json", b"[]", b'{"keys": "no"}', b'{"keys": []}', b"[" * 100000 + b"]" * 100000],
    ids=["not-json", "list", "keys-not-list", "no-keys", "deeply-nested"],
)
def test_unusable_key_set_documents_are_overloaded(oidc_issuer, verifier, document):
    oidc_issuer.jwks_body = document
    overloaded(verifier, oidc_issuer.mint())


def test_key_set_over_one_mebibyte_is_refused(oidc_issuer, verifier):
    oidc_issuer.extra_jwks.append({"kty": "oct", "kid": "padding", "k": "A" * (1 << 20)})
    overloaded(verifier, oidc_issuer.mint())


def test_key_set_just_under_the_limit_is_accepted(oidc_issuer, verifier):
    overhead = len(json.dumps(oidc_issuer.jwks())) + len(json.dumps({"kty": "oct", "kid": "padding", "k": ""})) + 2
    oidc_issuer.extra_jwks.append({"kty": "oct", "kid": "padding", "k": "A" * ((1 << 20) - overhead)})
    assert verifier.verify(oidc_issuer.mint()).subject == SUBJECT


def test_cached_keys_survive_a_failed_refresh(oidc_issuer, verifier, clock, caplog):
    verifier.verify(oidc_issuer.mint())
    oidc_issuer.jwks_status = 500
    clock.now += 3601  # the cache has expired
    with caplog.at_level(logging.WARNING, logger="devastator.oidc"):
        assert verifier.verify(oidc_issuer.mint(now=clock.now)).subject == SUBJECT
    assert oidc_issuer.fetches == 2
    assert "keeping the cached ones" in caplog.records[0].getMessage()
    oidc_issuer.stop()
    clock.now += 10
    assert verifier.verify(oidc_issuer.mint(now=clock.now)).subject == SUBJECT


@pytest.mark.parametrize(
    "max_age, lifetime",
    [(120, 120), (5, 60), (0, 60), (None, 3600), (10 * 86400, 86400)],
    ids=["120s", "clamped-up", "zero", "absent", "clamped-down"],
)
def test_cache_control_max_age_is_honoured(oidc_issuer, verifier, clock, max_age, lifetime):
    oidc_issuer.max_age = max_age
    start = clock.now
    verifier.verify(oidc_issuer.mint(now=start))
    clock.now = start + lifetime - 1
    verifier.verify(oidc_issuer.mint(now=clock.now))
    assert oidc_issuer.fetches == 1
    clock.now = start + lifetime
    verifier.verify(oidc_issuer.mint(now=clock.now))
    assert oidc_issuer.fetches == 2


def test_concurrent_verifies_share_one_fetch(oidc_issuer, verifier):
    tokens = [oidc_issuer.mint(f"user-{n}") for n in range(50)]
    greenlets = [gevent.spawn(verifier.verify, token) for token in tokens]
    gevent.joinall(greenlets, timeout=10, raise_error=True)
    assert [g.value.subject for g in greenlets] == [f"user-{n}" for n in range(50)]
    assert oidc_issuer.fetches == 1


def test_concurrent_unknown_kids_share_one_refetch(oidc_issuer, verifier, clock):
    verifier.verify(oidc_issuer.mint())
    oidc_issuer.rotate()
    clock.now += 10
    good = [oidc_issuer.mint(f"user-{n}") for n in range(20)]
    bad = [oidc_issuer.mint(kid=f"made-up-{n}") for n in range(20)]
    greenlets = [gevent.spawn(verify_or_refusal, verifier, token) for token in good + bad]
    gevent.joinall(greenlets, timeout=10, raise_error=True)
    assert [g.value.subject for g in greenlets[:20]] == [f"user-{n}" for n in range(20)]
    assert {g.value.message for g in greenlets[20:]} == {"ID token signed with an unknown key"}
    assert oidc_issuer.fetches == 2


# User ids


def test_user_id_for_a_valid_subject_is_readable():
    assert user_id_for("google", "1234567890") == "google-1234567890"


@pytest.mark.parametrize(
    "subject",
    ["9" * 60, "a b", "user/with/slashes", "ünïcödé", "\ud800", "x" * 255],
    ids=["too-long", "space", "slashes", "non-ascii", "lone-surrogate", "max-length"],
)
def test_user_id_for_other_subjects_is_a_stable_hash(subject):
    user_id = user_id_for("google", subject)
    digest = hashlib.sha256(subject.encode("utf-8", "surrogatepass")).hexdigest()
    assert user_id == "google-" + digest[:40]
    assert is_valid_user_id(user_id)
    assert user_id_for("google", subject) == user_id


def test_user_id_for_distinguishes_subjects_and_providers():
    ids = {user_id_for(prefix, subject) for prefix in ("google", "apple") for subject in ("a b", "a  b", "1")}
    assert len(ids) == 6


def test_user_id_for_refuses_an_unusable_prefix():
    with pytest.raises(ValueError):
        user_id_for("bad prefix", "1")
