"""Consumers of rows by reference that read, that vanish mid-lease, that read too late, and processes of
them killed mid-read, against a real `encoder-service serve --nixl` process (tests/test_rows_by_reference.py;
the full run: `python -m pytest -m soak tests/test_rows_by_reference.py`).

    python tests/rows_soak.py ADDRESS IMAGES_DIR EXPECTED.safetensors CONSUMERS LEASE_S OUT.json

Each consumer asks for one image's rows by reference (by digest first, its bytes if the cache lost it), then
(by its index):
- reads them (NIXL), compares them bit for bit with EXPECTED, releases the lease;
- vanishes: never reads, never releases (the lease must end at its expiry);
- reads after its lease ended: must be told (LeaseExpired), never given rows.
Counts go to OUT.json as they happen (a process killed mid-run leaves what it counted).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

KINDS = ("read", "vanish", "read", "vanish", "read", "vanish", "read", "late", "read", "vanish", "read", "vanish")


def main() -> None:
    address, images_dir, expected_path, consumers, out = sys.argv[1], Path(sys.argv[2]), sys.argv[3], \
        int(sys.argv[4]), Path(sys.argv[6])
    import torch
    from safetensors.torch import load_file

    from encoder_service.client.endpoint import EncoderClient
    from encoder_service.contract.media import MediaInput, Modality, media_digest
    from encoder_service.proto import encoder_pb2 as pb
    from encoder_service.transfer.reader import LeaseExpired, shared_reader

    expected = load_file(expected_path)
    images = [MediaInput(Modality.IMAGE, path.read_bytes()) for path in sorted(images_dir.glob("*.png"))]
    reader = shared_reader()
    counts = {"read_ok": 0, "wrong_rows": 0, "vanished": 0, "late_detected": 0, "late_given_rows": 0, "errors": 0}
    lock = threading.Lock()

    def report() -> None:
        with lock:
            out.write_text(json.dumps(counts))

    def consumer(client: EncoderClient, index: int) -> None:
        item = images[(index * 7919 + os.getpid()) % len(images)]
        digest = media_digest(item.data)
        kind = KINDS[index % len(KINDS)]
        try:
            result = client.encode([item], rows=pb.ROWS_BY_REFERENCE)
            if kind == "vanish":
                key = "vanished"
            elif kind == "late":
                time.sleep(max(0.0, result.reference.seconds_left()) + 0.3)  # the pool sweeps every 0.1 s
                try:
                    reader.read(result.reference, result.dtype, result.shape[1])
                    key = "late_given_rows"
                except LeaseExpired:
                    key = "late_detected"
            else:
                rows = reader.read(result.reference, result.dtype, result.shape[1])
                key = "read_ok" if torch.equal(rows, expected[digest]) else "wrong_rows"
        except Exception as e:  # noqa: BLE001 - counted; the test requires none
            print(f"consumer {index}: {type(e).__name__}: {e}", file=sys.stderr)
            key = "errors"
        with lock:
            counts[key] += 1

    late_threads: list[threading.Thread] = []
    with EncoderClient(address, timeout=30, probe=True) as client:
        for index in range(consumers):
            if KINDS[index % len(KINDS)] == "late":  # sleeps past its lease: beside the others
                late_threads.append(threading.Thread(target=consumer, args=(client, index)))
                late_threads[-1].start()
            else:
                consumer(client, index)
            if index % 20 == 0:
                report()
        for thread in late_threads:
            thread.join()
    report()


if __name__ == "__main__":
    main()
