"""The publisher splices a document's canonical JSON from fragments: it must be byte-identical."""

from control_plane.desired.layers import content_hash
from control_plane.desired.publisher import _fragment, _sha256, _splice
from protocol.signing import canonical_json


def test_spliced_document_is_byte_identical_to_canonical_json():
    document = {
        "schema": 1,
        "device_id": "dev-ü/1",
        "store_id": "S-001",
        "version": 12,
        "issued_at": "2026-01-01T08:00:00Z",
        "config": {"z": [1, 2.5, None], "a": {"y": "ß\u2028", "b": True}, "é": "\n"},
        "policies": {},
        "checks": {"nginx": {"kind": "process", "x": {"b": 1, "a": 2}}},
        "signing_keys": {"es256-b": "pem b", "es256-a": "pem a"},
        "kid": "es256-a",
        "sig": "abc_-",
    }
    assert _splice({key: _fragment(value) for key, value in document.items()}) == canonical_json(document)


def test_content_hash_from_fragments_equals_content_hash():
    content = {"config": {"a": {"é": 1}}, "policies": {"x": [1]}, "checks": {}, "signing_keys": {"k": "p"}}
    fragments = {key: _fragment(value) for key, value in content.items()}
    assert _sha256(_splice(fragments)) == content_hash(content)
