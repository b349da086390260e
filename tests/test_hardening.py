"""Production hardening on a real gRPC server on loopback: malformed fields, per-item error details,
request/decode budgets, admission control, TLS / mTLS / bearer tokens, the CLI (drain: tests/test_drain.py)."""

from __future__ import annotations

import dataclasses
import datetime
import io
import os
import subprocess
import sys
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
import torch
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from encoder_service.client.endpoint import ENCODE_METHOD, EncoderClient
from encoder_service.client.security import ClientSecurity
from encoder_service.contract.media import MediaInput, Modality
from encoder_service.contract.wire.channel import channel_options
from encoder_service.contract.wire.status import STATUS_DETAILS_KEY, item_from_status
from encoder_service.proto import encoder_pb2 as pb
from encoder_service.serving.api.security import TLSConfig
from encoder_service.serving.api.server import BackgroundServer, ServerConfig
from tests.conftest import gradient_png, image_bytes

NO_SECURITY = ClientSecurity()


@pytest.fixture(scope="module")
def client(encoder_server):
    with EncoderClient(encoder_server.address, timeout=60, security=NO_SECURITY) as c:
        c.wait_ready()
        yield c


def _raw_call(address: str, request: pb.EncodeRequest) -> grpc.RpcError:
    with grpc.insecure_channel(address, options=channel_options()) as channel:
        call = channel.unary_unary(ENCODE_METHOD, request_serializer=pb.EncodeRequest.SerializeToString,
                                   response_deserializer=pb.EncodeResponse.FromString)
        with pytest.raises(grpc.RpcError) as failed:
            call(request, timeout=60)
    return failed.value


def _still_serves(client) -> None:
    out = client.encode([MediaInput(Modality.IMAGE, image_bytes(64, 48))])
    assert out.embeddings.shape[0] == out.items[0].token_count > 0


@pytest.mark.parametrize("shape", [[2**62, 4, 3], [2**31, 2**31, 3], [4, -1, 3], [2**63 - 1, 1, 1]])
def test_overflowing_or_negative_shapes_are_invalid_argument_never_internal(encoder_server, client, shape):
    good = pb.MediaItem(item_id="ok", modality=pb.MODALITY_IMAGE, encoded_image=image_bytes(32, 32))
    bad = pb.MediaItem(item_id="huge", modality=pb.MODALITY_IMAGE,
                       raw_pixels=pb.Tensor(dtype=pb.DTYPE_UINT8, shape=shape))
    error = _raw_call(encoder_server.address, pb.EncodeRequest(items=[good, bad]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert error.details().startswith("item 1 ('huge'): ")
    assert item_from_status(error) == (1, "huge")
    _still_serves(client)


def _status_details(error: grpc.RpcError) -> status_pb2.Status:
    [value] = [v for k, v in error.trailing_metadata() if k == STATUS_DETAILS_KEY]
    return status_pb2.Status.FromString(value)


def _truncated_jpeg() -> bytes:
    data = image_bytes(300, 200, "JPEG", seed=1)
    return data[: len(data) // 3]  # header intact (plans fine), pixels missing: fails while decoding


def test_every_per_item_error_names_its_item_in_message_and_standard_details(encoder_server, client):
    frames = [Image.new("RGB", (32, 32), (40 * i, 0, 0)) for i in range(3)]
    apng = io.BytesIO()
    frames[0].save(apng, format="PNG", save_all=True, append_images=frames[1:])
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF")
    bad_items = {
        "corrupt": pb.MediaItem(modality=pb.MODALITY_IMAGE, encoded_image=b"not an image"),
        "truncated": pb.MediaItem(modality=pb.MODALITY_IMAGE, encoded_image=_truncated_jpeg()),
        "gif": pb.MediaItem(modality=pb.MODALITY_IMAGE, encoded_image=gif.getvalue()),
        # junk behind another format's magic (SGI's): its decoder must never see it (it raised ValueError)
        "sgi-magic": pb.MediaItem(modality=pb.MODALITY_IMAGE, encoded_image=b"\x01\xda" + bytes(600)),
        "apng": pb.MediaItem(modality=pb.MODALITY_IMAGE, encoded_image=apng.getvalue()),
        "empty-video": pb.MediaItem(modality=pb.MODALITY_VIDEO, encoded_frames=pb.EncodedFrames()),
        "no-data": pb.MediaItem(modality=pb.MODALITY_IMAGE),
        "bad-modality": pb.MediaItem(modality=7, encoded_image=image_bytes(8, 8)),
        "frames-on-image": pb.MediaItem(modality=pb.MODALITY_IMAGE, encoded_frames=pb.EncodedFrames(frames=[b"x"])),
        "rate-on-image": pb.MediaItem(modality=pb.MODALITY_IMAGE, encoded_image=image_bytes(8, 8), pruning_rate=0.5),
    }
    for index in (0, 2):
        for name, bad in bad_items.items():
            bad.item_id = name
            items = [pb.MediaItem(item_id=f"ok{i}", modality=pb.MODALITY_IMAGE, encoded_image=image_bytes(40, 30))
                     for i in range(3)]
            items[index] = bad
            error = _raw_call(encoder_server.address, pb.EncodeRequest(items=items))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, error.details())
            assert error.details().startswith(f"item {index} ({name!r}): "), error.details()
            assert " at 0x" not in error.details() and "/" not in error.details().split(": ", 1)[1], error.details()
            status = _status_details(error)
            request = error_details_pb2.BadRequest()
            assert status.details[0].Unpack(request)
            assert request.field_violations[0].field == f"items[{index}]"
            assert item_from_status(error) == (index, name)
    _still_serves(client)


def test_sixteen_bit_grey_png_is_scaled_not_clipped(engine):
    grey16 = np.full((48, 64), 0x4000, dtype=np.uint16)  # a quarter of full scale
    buf = io.BytesIO()
    Image.fromarray(grey16).save(buf, format="PNG")
    as_8bit = np.full((48, 64, 3), 64, dtype=np.uint8)  # 0x4000 / 65535 * 255 = 63.75
    got = engine.encode([MediaInput(Modality.IMAGE, buf.getvalue())]).embeddings
    want = engine.encode([MediaInput(Modality.IMAGE, as_8bit)]).embeddings
    white = engine.encode([MediaInput(Modality.IMAGE, np.full_like(as_8bit, 255))]).embeddings
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, white, atol=1e-3)


def test_request_bytes_decode_budget_and_admission_are_refused_fast(engine_config):
    cfg = ServerConfig(port=0, engine=dataclasses.replace(engine_config, max_decode_pixels_per_request=4_000_000),
                       max_request_bytes=2 << 20, max_inflight_requests=1)
    rng = np.random.default_rng()
    with BackgroundServer(cfg) as server, EncoderClient(server.address, timeout=60, security=NO_SECURITY) as client:
        junk = MediaInput(Modality.IMAGE, rng.bytes(3 << 20))
        with pytest.raises(grpc.RpcError) as too_big:
            client.encode([junk])
        assert too_big.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # 3 x 1.5 MP from the headers alone: refused before any pixel is decoded (three different images:
        # identical ones are decoded once).
        flats = []
        for shade in (9, 10, 11):
            flat = io.BytesIO()
            Image.new("RGB", (1500, 1000), (shade, 9, 9)).save(flat, format="PNG")
            flats.append(MediaInput(Modality.IMAGE, flat.getvalue()))
        t0 = time.perf_counter()
        with pytest.raises(grpc.RpcError) as budget:
            client.encode(flats)
        assert budget.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "MP" in budget.value.details() and time.perf_counter() - t0 < 2
        # One request in flight at most: a second one is turned away at once with a retry hint.
        slow = [MediaInput(Modality.IMAGE, gradient_png(1000, 650, i)) for i in range(6)]  # 3.9 MP, small
        outcome: dict = {}
        first = threading.Thread(target=lambda: outcome.setdefault("first", client.encode(slow)))
        first.start()
        refused = None
        for _ in range(200):
            time.sleep(0.01)
            try:
                client.encode([MediaInput(Modality.IMAGE, image_bytes(16, 16))])
            except grpc.RpcError as e:
                refused = e
                break
        first.join()
        assert refused is not None and refused.code() == grpc.StatusCode.UNAVAILABLE
        assert dict(refused.trailing_metadata())["retry-after-ms"] == str(cfg.retry_after_ms)
        assert outcome["first"].embeddings.shape[0] > 0 and server.counters.refused >= 1
        _still_serves(client)


def _certificates(tmp_path):
    """A CA, a server certificate for 127.0.0.1 / localhost and a client certificate, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def issue(name, issuer_name, issuer_key, key, ca=False, san=None, usage=None):
        builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                   .issuer_name(issuer_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        if usage:
            builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    def write(name, cert, key):
        (tmp_path / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (tmp_path / f"{name}.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        return str(tmp_path / f"{name}.pem"), str(tmp_path / f"{name}.key")

    import ipaddress

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca = issue("test CA", ca_name, ca_key, ca_key, ca=True)
    server_key, client_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    server = issue("localhost", ca_name, ca_key, server_key,
                   san=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
                   usage=ExtendedKeyUsageOID.SERVER_AUTH)
    client = issue("llm-worker", ca_name, ca_key, client_key, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    return write("ca", ca, ca_key)[0], write("server", server, server_key), write("client", client, client_key)


def test_tls_mutual_tls_and_bearer_token(engine_config, tmp_path, monkeypatch):
    ca, (server_cert, server_key), (client_cert, client_key) = _certificates(tmp_path)
    token_file = tmp_path / "token"
    token_file.write_text(os.urandom(16).hex() + "\n")
    token = token_file.read_text().strip()
    cfg = ServerConfig(port=0, engine=engine_config, tls=TLSConfig(server_cert, server_key, client_ca_file=ca),
                       auth_token_file=str(token_file))
    item = [MediaInput(Modality.IMAGE, image_bytes(40, 30))]
    with BackgroundServer(cfg) as server:
        address = f"localhost:{server.server.port}"
        full = ClientSecurity(ca_file=ca, cert_file=client_cert, key_file=client_key, token=token)
        with EncoderClient(address, timeout=30, security=full) as c:
            assert c.encode(item).embeddings.shape[0] > 0
        for security, code in [
            (ClientSecurity(ca_file=ca, cert_file=client_cert, key_file=client_key), grpc.StatusCode.UNAUTHENTICATED),
            (ClientSecurity(ca_file=ca, cert_file=client_cert, key_file=client_key, token="wrong"),
             grpc.StatusCode.UNAUTHENTICATED),
            (ClientSecurity(ca_file=ca, token=token), grpc.StatusCode.UNAVAILABLE),  # no client certificate
            (ClientSecurity(token=token), grpc.StatusCode.UNAVAILABLE),  # plaintext to a TLS port
        ]:
            with EncoderClient(address, timeout=10, security=security) as c, pytest.raises(grpc.RpcError) as e:
                c.encode(item)
            assert e.value.code() == code, security
        # Health checks stay open to orchestrators without the token (TLS still applies).
        with ClientSecurity(ca_file=ca, cert_file=client_cert, key_file=client_key).channel(address, []) as ch:
            status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert status.status == health_pb2.HealthCheckResponse.SERVING
        # The environment configures clients (and the CLI) without code.
        for key, value in {"ENCODER_SERVICE_CA": ca, "ENCODER_SERVICE_CLIENT_CERT": client_cert,
                           "ENCODER_SERVICE_CLIENT_KEY": client_key, "ENCODER_SERVICE_TOKEN_FILE": str(token_file)}.items():
            monkeypatch.setenv(key, value)
        with EncoderClient(address, timeout=30) as c:
            assert c.encode(item).embeddings.shape[0] > 0


def test_non_loopback_address_needs_tls_or_insecure(engine_config, tmp_path):
    for host in ("0.0.0.0", "", "10.1.2.3", "[::]"):
        with pytest.raises(ValueError, match="without TLS"):
            ServerConfig(host=host, engine=engine_config).check()
        ServerConfig(host=host, engine=engine_config, insecure=True).check()
    ServerConfig(host="127.0.0.1", engine=engine_config).check()
    ServerConfig(host="0.0.0.0", engine=engine_config, tls=TLSConfig("c", "k")).check()


def _serve(*extra: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "encoder_service.cli", "serve", "--port", "0",
                             "--preprocess-workers", "1", *extra], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONFAULTHANDLER": "1"})  # a crash leaves its stack
    line = proc.stdout.readline()
    assert "listening" in line, line
    return proc, line.split()[-1]


def test_cli_prints_one_line_per_failure_with_exit_codes(tmp_path):
    def run(*args):
        done = subprocess.run([sys.executable, "-m", "encoder_service.cli", *args], capture_output=True, text=True,
                              timeout=120)
        return done.returncode, done.stderr.strip().splitlines()

    code, err = run("encode", str(tmp_path / "missing.png"))
    assert code == 2 and len(err) == 1 and "cannot read" in err[0]
    t0 = time.perf_counter()
    code, err = run("encode", str(tmp_path / "missing.png").replace("missing.png", "x.png"), "--address", "127.0.0.1:1")
    assert code == 2  # the file is checked first
    (tmp_path / "x.png").write_bytes(image_bytes(20, 20))
    code, err = run("encode", str(tmp_path / "x.png"), "--address", "127.0.0.1:1", "--connect-timeout", "2")
    assert code == 3 and len(err) == 1 and "no encoder server" in err[0] and time.perf_counter() - t0 < 30
    code, err = run("serve", "--host", "0.0.0.0", "--port", "0")
    assert code == 2 and len(err) == 1 and "without TLS" in err[0]
    proc, address = _serve()
    try:
        (tmp_path / "bad.png").write_bytes(b"\x89PNG garbage")
        code, err = run("encode", str(tmp_path / "x.png"), str(tmp_path / "bad.png"), "--address", address)
        assert code == 4 and len(err) == 1 and "INVALID_ARGUMENT" in err[0] and "bad.png" in err[0], err
        code, err = run("encode", str(tmp_path / "x.png"), "--address", address)
        assert code == 0, err
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_prometheus_metrics_count_requests_by_status_stages_and_bytes(engine_config):
    with BackgroundServer(ServerConfig(port=0, engine=engine_config, metrics_port=0)) as server, \
            EncoderClient(server.address, timeout=60, security=NO_SECURITY) as client:
        out = client.encode([MediaInput(Modality.IMAGE, image_bytes(120, 90)) for _ in range(2)])
        with pytest.raises(grpc.RpcError):
            client.encode([MediaInput(Modality.IMAGE, b"junk")])
        text = urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics", timeout=10).read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    assert values['encoder_requests_total{code="OK"}'] == 1
    assert values['encoder_requests_total{code="INVALID_ARGUMENT"}'] == 1
    assert values["encoder_tokens_out_total"] == out.embeddings.shape[0]
    assert values["encoder_bytes_out_total"] >= out.embeddings.numel() * out.embeddings.element_size()
    for stage in ("queue", "preprocess", "forward", "serialize"):
        assert values[f'encoder_stage_seconds_count{{stage="{stage}"}}'] == 1
    assert values["encoder_request_seconds_count"] == 2 and values["encoder_batch_tiles_count"] == 1
    assert values["encoder_inflight_requests"] == 0 and values["encoder_outputs_in_use_bytes"] >= 0
