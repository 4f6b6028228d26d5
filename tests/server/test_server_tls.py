"""TLS: a client trusting the test CA completes a secure completion; one that does not, cannot."""

from __future__ import annotations

import pytest
import requests

from nomyo.server import start_background
from tests.server_fixtures import (
    COMPLETION,
    chat_request,
    completion_headers,
    keypair,
    open_response,
    seal_request,
    vector_keys,
)

trustme = pytest.importorskip("trustme", reason="trustme (test extra) is needed for the TLS tests")


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    folder = tmp_path_factory.mktemp("tls")
    cert_file, key_file, ca_file = folder / "cert.pem", folder / "key.pem", folder / "ca.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    ca.cert_pem.write_to_path(str(ca_file))
    with start_background(
        key=keypair("server"), tls_cert=str(cert_file), tls_key=str(key_file)
    ) as srv:
        yield srv, str(ca_file)


def test_trusted_client_completes_over_tls(tls_server) -> None:
    srv, ca_file = tls_server
    assert srv.url.startswith("https://")
    # verify= per call: a session-level verify loses to $REQUESTS_CA_BUNDLE in requests
    with requests.Session() as session:
        pem = session.get(srv.url + "/pki/public_key", verify=ca_file, timeout=10).text
        response = session.post(
            srv.url + COMPLETION,
            timeout=30,
            verify=ca_file,
            data=seal_request(chat_request("over TLS"), pem),
            headers=completion_headers(vector_keys()["client_public_pem"]),
        )
        assert response.status_code == 200
        assert "over TLS" in open_response(response.content)[0]["choices"][0]["message"]["content"]


def test_untrusting_client_cannot_connect_and_server_survives(tls_server) -> None:
    srv, ca_file = tls_server
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(srv.url + "/pki/public_key", timeout=10)  # system CAs only
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(srv.url.replace("https://", "http://") + "/health", timeout=10)
    assert requests.get(srv.url + "/health", verify=ca_file, timeout=10).status_code == 200


def test_nomyo_serve_over_tls_on_granian(tmp_path) -> None:
    """`nomyo serve --tls-cert/--tls-key` (granian): PKCS#8 keys only, 0600, said clearly."""
    from cryptography.hazmat.primitives import serialization

    from tests.server_fixtures import Served, kill_group, serve_process

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert_file, key_file, ca_file = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    ca.cert_pem.write_to_path(str(ca_file))
    cert.private_key_pem.write_to_path(str(key_file))  # "EC PRIVATE KEY": not PKCS#8
    key_file.chmod(0o600)
    proc = serve_process("--tls-cert", str(cert_file), "--tls-key", str(key_file))
    try:
        _, err = proc.communicate(timeout=30)
    finally:
        kill_group(proc)
    assert proc.returncode == 2 and "openssl pkcs8" in err
    key = serialization.load_pem_private_key(cert.private_key_pem.bytes(), password=None)
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    with Served("--tls-cert", str(cert_file), "--tls-key", str(key_file), key_dir=tmp_path) as srv:
        assert srv.url.startswith("https://")
        response = requests.post(
            srv.url + COMPLETION, timeout=30, verify=str(ca_file),
            data=seal_request(chat_request("granian TLS"), srv.public_key_pem),
            headers=completion_headers(vector_keys()["client_public_pem"]),
        )
        assert response.status_code == 200
        assert "granian TLS" in open_response(response.content)[0]["choices"][0]["message"][
            "content"]
