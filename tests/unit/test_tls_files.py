"""TLS start-up checks (spec/cluster-protocol.md §7.2, §7.3): certificate files, passwords, expiry, CA, CRL,
cipher_list, and the SSL contexts built from them; the expiry watcher (§7.4)."""

from __future__ import annotations

import datetime as dt
import logging
import ssl
from pathlib import Path

import pytest
import trio

from flcluster.config import ClusterConfig, FLContext
from flcluster.errors import ConfigError
from flcluster.tls import ALLOWED_CIPHERS, NodeTls, TlsRole, load_node_tls, watch_certificates
from flcluster.tls.certificates import WatchedCertificate, expiry_notice
from flcluster.tls.contexts import https_client_context
from tests.tls_material import CLIENT_PASSWORD, SERVER_PASSWORD, ClusterPki, make_pki, write_pem

TLS_CONTEXT = FLContext(
    enable_ssl=True,
    config_file_path="/etc/fl/config.json",
    server_password=SERVER_PASSWORD,
    client_password=CLIENT_PASSWORD,
)
NOW = dt.datetime.now(dt.UTC)


@pytest.fixture
def pki(tmp_path: Path) -> ClusterPki:
    return make_pki(tmp_path / "pki")


def refusal(ctx: FLContext, config: ClusterConfig, role: TlsRole = TlsRole.SERVER) -> str:
    with pytest.raises(ConfigError) as info:
        load_node_tls(ctx, config, role)
    return str(info.value)


# ------------------------------------------------------------------------------------------ what loads


def test_without_enable_ssl_nothing_is_loaded(pki: ClusterPki) -> None:
    assert load_node_tls(FLContext(), pki.config(server_cert_path="/nowhere"), TlsRole.SERVER) is None


@pytest.mark.parametrize("form", ["p12", "pem"])
def test_a_server_gets_listener_connector_and_https_contexts(pki: ClusterPki, form: str) -> None:
    config = (
        pki.config()
        if form == "p12"
        else pki.config(server_cert_path=str(pki.server_pem), client_cert_path=str(pki.client_pem))
    )
    tls = load_node_tls(TLS_CONTEXT, config, TlsRole.SERVER)
    assert isinstance(tls, NodeTls)
    assert tls.listener is not None and tls.listener.verify_mode is ssl.CERT_REQUIRED
    assert tls.connector is not None and tls.connector.verify_mode is ssl.CERT_REQUIRED
    assert tls.connector.check_hostname is False  # cluster links: the CA is the identity (§7.1)
    assert tls.https is not None and tls.https.verify_mode is ssl.CERT_NONE
    for context in (tls.listener, tls.connector, tls.https):
        assert context.minimum_version is ssl.TLSVersion.TLSv1_2
    assert [w.key for w in tls.watched] == ["ca_cert_path", "server_cert_path", "client_cert_path"]
    assert (tls.warning_days, tls.check_interval_hours) == (90, 168)


def test_each_role_loads_only_what_it_needs(pki: ClusterPki) -> None:
    sched = load_node_tls(TLS_CONTEXT, pki.config(client_cert_path=""), TlsRole.SCHEDULER)
    assert sched is not None and sched.connector is None and sched.listener and sched.https
    tool = load_node_tls(TLS_CONTEXT, pki.config(server_cert_path=""), TlsRole.TOOL)
    assert tool is not None and tool.connector is not None and tool.listener is None and tool.https is None


def test_a_pem_key_encrypted_with_the_password_loads(pki: ClusterPki) -> None:
    encrypted = write_pem(pki.folder / "server-enc.pem", pki.server_leaf, SERVER_PASSWORD)
    assert load_node_tls(TLS_CONTEXT, pki.config(server_cert_path=str(encrypted)), TlsRole.SCHEDULER)


# ------------------------------------------------------------------------------------- what is refused


def test_enable_ssl_without_config_json_is_refused(pki: ClusterPki) -> None:
    message = refusal(FLContext(enable_ssl=True), ClusterConfig())
    assert message.startswith("enable_ssl=True needs config_file_path")
    assert "server_cert_path, client_cert_path, ca_cert_path" in message


@pytest.mark.parametrize("key", ["server_cert_path", "client_cert_path", "ca_cert_path"])
def test_a_missing_key_is_refused_by_name(pki: ClusterPki, key: str) -> None:
    message = refusal(TLS_CONTEXT, pki.config(**{key: ""}))
    assert message.startswith(f"enable_ssl=True needs config.json key {key!r} in '/etc/fl/config.json'")


@pytest.mark.parametrize("key", ["server_cert_path", "client_cert_path", "ca_cert_path", "crl_path"])
def test_a_file_that_is_not_there_is_refused_naming_key_and_path(pki: ClusterPki, key: str) -> None:
    missing = str(pki.folder / "missing.p12")
    message = refusal(TLS_CONTEXT, pki.config(**{key: missing}))
    assert message == (
        f"config.json key {key!r}: the file {missing!r} cannot be read: No such file or directory"
    )


def test_a_wrong_p12_password_is_refused_without_showing_it(pki: ClusterPki) -> None:
    ctx = TLS_CONTEXT.evolve(server_password="not-the-password")
    message = refusal(ctx, pki.config())
    assert message == (
        f"config.json key 'server_cert_path': the file {str(pki.server_p12)!r} is refused: server_password "
        "does not open it, or it is not a PKCS#12 file"
    )
    assert "not-the-password" not in message and SERVER_PASSWORD not in message


def test_a_p12_without_its_password_is_refused(pki: ClusterPki) -> None:
    message = refusal(TLS_CONTEXT.evolve(client_password=""), pki.config())
    assert "client_cert_path" in message and "protected by a password (set client_password)" in message


def test_a_file_that_is_neither_pem_nor_p12_is_refused(pki: ClusterPki) -> None:
    junk = pki.folder / "junk.p12"
    junk.write_bytes(b"\x00\x01 not a certificate")
    assert "is refused" in refusal(TLS_CONTEXT, pki.config(server_cert_path=str(junk)))


def test_an_encrypted_pem_key_needs_its_password(pki: ClusterPki) -> None:
    encrypted = str(write_pem(pki.folder / "server-enc.pem", pki.server_leaf, SERVER_PASSWORD))
    message = refusal(TLS_CONTEXT.evolve(server_password=""), pki.config(server_cert_path=encrypted))
    assert message == (
        f"config.json key 'server_cert_path': the private key in {encrypted!r} is encrypted; "
        "set server_password"
    )
    message = refusal(TLS_CONTEXT.evolve(server_password="wrong"), pki.config(server_cert_path=encrypted))
    assert "server_password does not open it" in message


def test_a_pem_without_a_key_and_a_key_of_another_certificate_are_refused(pki: ClusterPki) -> None:
    cert_only = pki.folder / "cert-only.pem"
    cert_only.write_bytes(pki.server_leaf.cert_chain_pems[0].bytes())
    assert "holds no private key" in refusal(TLS_CONTEXT, pki.config(server_cert_path=str(cert_only)))
    mixed = pki.folder / "mixed.pem"
    mixed.write_bytes(pki.server_leaf.cert_chain_pems[0].bytes() + pki.client_leaf.private_key_pem.bytes())
    assert "does not belong to its certificate" in refusal(
        TLS_CONTEXT, pki.config(server_cert_path=str(mixed))
    )


def test_an_expired_certificate_is_refused_naming_the_file(tmp_path: Path) -> None:
    expired = dt.datetime(2025, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    assert expired < NOW
    old = make_pki(tmp_path / "old", not_before=expired - dt.timedelta(days=365), not_after=expired)
    message = refusal(TLS_CONTEXT, old.config())
    assert message.startswith(
        f"the certificate in server_cert_path {str(old.server_p12)!r} (CN=flcluster-server"
    )
    assert message.endswith(") expired on 2025-01-02 03:04:05 UTC; replace it with a valid certificate")


def test_a_certificate_not_valid_yet_is_refused(tmp_path: Path) -> None:
    early = make_pki(tmp_path / "early", not_before=NOW + dt.timedelta(days=2))
    assert "is not valid before" in refusal(TLS_CONTEXT, early.config())


def test_a_certificate_from_another_ca_is_refused_at_start_up(pki: ClusterPki, tmp_path: Path) -> None:
    other = make_pki(tmp_path / "other")
    message = refusal(TLS_CONTEXT, pki.config(client_cert_path=str(other.client_p12)))
    assert message.startswith(
        f"config.json key 'client_cert_path': the certificate in {str(other.client_p12)!r}"
    )
    assert "is not issued by a CA in ca_cert_path" in message


def test_the_crl_is_applied_and_checked(pki: ClusterPki, tmp_path: Path) -> None:
    clean = pki.crl([])
    tls = load_node_tls(TLS_CONTEXT, pki.config(crl_path=str(clean)), TlsRole.SERVER)
    assert tls is not None and tls.listener is not None
    assert tls.listener.verify_flags & ssl.VERIFY_CRL_CHECK_LEAF
    revoking = pki.crl([pki.server_leaf])
    assert "is revoked by the CRL in crl_path" in refusal(TLS_CONTEXT, pki.config(crl_path=str(revoking)))
    stale = pki.crl([], next_update=NOW - dt.timedelta(days=1))
    assert "is out of date" in refusal(TLS_CONTEXT, pki.config(crl_path=str(stale)))
    foreign = make_pki(tmp_path / "other").crl([])
    assert "is not signed by a CA in ca_cert_path" in refusal(TLS_CONTEXT, pki.config(crl_path=str(foreign)))


# ----------------------------------------------------------------------------------------- cipher_list


def _tls12_ciphers(context: ssl.SSLContext) -> set[str]:
    return {c["name"] for c in context.get_ciphers() if c["protocol"] == "TLSv1.2"}


def test_cipher_list_sets_the_tls12_suites(pki: ClusterPki) -> None:
    chosen = "ECDHE-ECDSA-AES128-GCM-SHA256"
    tls = load_node_tls(TLS_CONTEXT, pki.config(cipher_list=chosen), TlsRole.SERVER)
    assert tls is not None and tls.listener and tls.connector and tls.https
    for context in (tls.listener, tls.connector, tls.https):
        assert _tls12_ciphers(context) == {chosen}
    default = load_node_tls(TLS_CONTEXT, pki.config(), TlsRole.SERVER)
    assert default is not None and default.listener is not None
    assert _tls12_ciphers(default.listener) <= set(ALLOWED_CIPHERS)
    assert len(_tls12_ciphers(default.listener)) == 6


async def test_a_tls12_handshake_negotiates_the_configured_cipher(pki: ClusterPki) -> None:
    chosen = "ECDHE-ECDSA-AES256-GCM-SHA384"
    tls = load_node_tls(TLS_CONTEXT, pki.config(cipher_list=chosen), TlsRole.SERVER)
    assert tls is not None and tls.listener is not None and tls.connector is not None
    tls.connector.maximum_version = ssl.TLSVersion.TLSv1_2
    left, right = trio.testing.memory_stream_pair()
    server = trio.SSLStream(left, tls.listener, server_side=True)
    client = trio.SSLStream(right, tls.connector, server_hostname=None)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.do_handshake)
        nursery.start_soon(client.do_handshake)
    cipher = client.cipher()
    assert cipher is not None and cipher[0] == chosen and client.version() == "TLSv1.2"


@pytest.mark.parametrize(
    ("cipher_list", "named"),
    [("AES128-SHA", "'AES128-SHA'"), ("ECDHE-RSA-AES128-GCM-SHA256:", "''"), ("RC4-MD5:ALL", "'RC4-MD5'")],
)
def test_a_cipher_outside_the_allowed_list_is_refused(pki: ClusterPki, cipher_list: str, named: str) -> None:
    message = refusal(TLS_CONTEXT, pki.config(cipher_list=cipher_list))
    assert message.startswith(f"config.json key 'cipher_list'={cipher_list!r} is refused: {named} is not")


# ------------------------------------------------------------------------------------------ HTTPS client


def test_the_https_client_context_checks_host_names_against_the_given_ca(pki: ClusterPki) -> None:
    context = https_client_context(str(pki.ca_path), str(pki.client_p12), CLIENT_PASSWORD)
    assert context.check_hostname and context.verify_mode is ssl.CERT_REQUIRED
    assert len(context.get_ca_certs()) == 1  # only the given CA, not the system's
    with pytest.raises(ConfigError, match=r"argument client_cert: the file .* is refused"):
        https_client_context(str(pki.ca_path), str(pki.client_p12), "wrong")


# --------------------------------------------------------------------------------------- expiry watcher


def watched(days_left: float) -> WatchedCertificate:
    return WatchedCertificate(
        key="server_cert_path",
        path="/etc/fl/server.p12",
        subject="CN=s",
        not_before=NOW - dt.timedelta(days=100),
        not_after=NOW + dt.timedelta(days=days_left),
    )


def test_expiry_notices() -> None:
    assert expiry_notice(watched(91), now=NOW, warning_days=90) is None
    level, text = expiry_notice(watched(30.5), now=NOW, warning_days=90) or ("", "")
    assert level == "warning"
    assert text.startswith("the certificate in server_cert_path '/etc/fl/server.p12' (CN=s) expires on ")
    assert "in 30 days (cert_expire_warning_time_in_day=90); renew it" in text
    level, text = expiry_notice(watched(-1), now=NOW, warning_days=90) or ("", "")
    assert level == "error" and "expired on" in text and "a restart will refuse it" in text


async def test_the_watcher_reports_at_start_and_every_interval(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    tls = NodeTls(None, None, None, (watched(10), watched(200)), warning_days=30, check_interval_hours=2)
    with caplog.at_level(logging.WARNING, logger="flcluster.tls"):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: watch_certificates(tls, clock=lambda: NOW))
            await trio.sleep(5 * 3600)  # reports at 0 h, 2 h and 4 h
            nursery.cancel_scope.cancel()
    notices = [r.getMessage() for r in caplog.records if r.name == "flcluster.tls"]
    assert len(notices) == 3 and all("in 10 days" in n for n in notices)


# ----------------------------------------------------------------------------------- config.json keys


def test_config_json_takes_the_token_and_resolves_the_tls_paths(tmp_path: Path) -> None:
    import json

    from flcluster.config import load_cluster_config

    file = tmp_path / "config.json"
    file.write_text(json.dumps({"server_cert_path": "certs/server.p12", "manage_token": "T" * 16}))
    config = load_cluster_config(file)
    assert config.manage_token == "T" * 16 and "T" * 16 not in repr(config)
    assert config.server_cert_path == str(tmp_path / "certs" / "server.p12")
    file.write_text(json.dumps({"manage_token": "has a blank in it, sixteen+"}))
    with pytest.raises(ConfigError) as info:
        load_cluster_config(file)
    assert "key 'manage_token' is refused" in str(info.value) and "got <hidden str>" in str(info.value)
    assert "blank" not in str(info.value)
