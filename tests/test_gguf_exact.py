"""GGUF reader and writer, exactly: every value type and array kind round-trips and reads the same in
the ``gguf`` package, files written by the ``gguf`` package read the same in ours, and each malformed
header (built byte by byte here) is refused with the message that names its problem."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from llmlab.common import LlmlabError
from llmlab.formats.gguf import GGUFFile, write_gguf
from tests.conftest import need

SCALARS = {0: 200, 1: -100, 2: 60000, 3: -30000, 4: 4_000_000_000, 5: -2_000_000_000, 6: 0.25, 7: True,
           10: 2**63 + 5, 11: -(2**62), 12: 1e300}


def test_every_value_type_round_trips_and_reads_in_gguf():
    gguf = need("gguf")
    meta = {f"s.{t}": v for t, v in SCALARS.items()}
    meta.update({"str": "héllo 日本", "arr.f": [0.5, 1.5], "arr.s": ["a", "", "bé"], "arr.i": [1, -2, 3],
                 "arr.u8": [1, 2, 255], "arr.nested": [[1, 2], [3]], "arr.empty": [], "auto.int": 7,
                 "auto.big": 2**40, "auto.neg": -1, "auto.bool": False, "auto.float": 2.5, "auto.mixed": [1, 2.5]})
    types = {f"s.{t}": t for t in SCALARS}
    types.update({"arr.u8": (9, 0), "arr.nested": (9, 9)})
    path = _tmp("values.gguf")
    write_gguf(path, meta, {}, types=types)
    ours = GGUFFile(path)
    for t, v in SCALARS.items():
        assert ours.metadata[f"s.{t}"] == v and ours.metadata_types[f"s.{t}"] == t
    assert ours.metadata["str"] == "héllo 日本" and ours.metadata_types["str"] == 8
    assert ours.metadata["arr.f"] == [0.5, 1.5] and ours.metadata["arr.s"] == ["a", "", "bé"]
    assert ours.metadata["arr.i"] == [1, -2, 3] and ours.metadata["arr.u8"] == [1, 2, 255]
    assert ours.metadata["arr.nested"] == [[1, 2], [3]] and ours.metadata["arr.empty"] == []
    assert ours.metadata["auto.mixed"] == [1.0, 2.5]
    assert [ours.metadata_types[k] for k in ("auto.int", "auto.big", "auto.neg", "auto.bool", "auto.float")] == \
        [4, 11, 11, 7, 6]
    ref = gguf.GGUFReader(str(path))
    for key in ("s.0", "s.1", "s.4", "s.5", "s.7", "s.10", "s.11", "s.12", "str", "arr.s", "arr.i", "auto.big"):
        assert ref.fields[key].contents() == ours.metadata[key], key
    assert ref.fields["arr.i"].types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32]
    assert ref.fields["arr.f"].types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.FLOAT32]
    with pytest.raises(TypeError, match="cannot store dict"):
        write_gguf(_tmp("bad.gguf"), {"x": {}}, {})
    with pytest.raises(ValueError, match="bad GGUF value type 99"):
        write_gguf(_tmp("bad.gguf"), {"x": 1}, {}, types={"x": 99})


def test_tensors_round_trip_with_shapes_offsets_and_alignment():
    gguf = need("gguf")
    a = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    b = torch.arange(5, dtype=torch.float16)
    scalar = torch.tensor([7.0])
    for alignment, name in ((32, "a"), (64, "a"), (64, "a-long-name-that-moves-the-header-end")):
        path = _tmp(f"t{alignment}.gguf")
        write_gguf(path, {"general.architecture": "x"},
                   {name: (a.numpy().tobytes(), (3, 4), 0), "b": (b.numpy().tobytes(), (5,), 1),
                    "s": (scalar.numpy().tobytes(), (), 0)}, alignment=alignment)
        ours = GGUFFile(path)
        assert ours.version == 3 and ours.metadata.get("general.alignment", 32) == alignment
        assert [(i.name, i.shape, i.ggml_type, i.nbytes, i.numel, i.type_name) for i in ours.tensors.values()] == \
            [(name, (3, 4), 0, 48, 12, "F32"), ("b", (5,), 1, 10, 5, "F16"), ("s", (1,), 0, 4, 1, "F32")]
        assert all(i.offset % alignment == 0 for i in ours.tensors.values())
        assert torch.equal(ours.load(name), a) and torch.equal(ours.load("b"), b.float())
        assert ours.raw(ours.tensors["b"]).tolist() == list(b.numpy().tobytes())
        assert torch.equal(ours.load("s"), scalar)
        ref = gguf.GGUFReader(str(path))
        ours_offsets = [(i.name, i.offset) for i in ours.tensors.values()]
        assert [(t.name, int(t.data_offset)) for t in ref.tensors] == ours_offsets
        assert np.array_equal(ref.tensors[0].data.reshape(3, 4), a.numpy())
    with pytest.raises(ValueError, match="general.alignment=16 but alignment=32"):
        write_gguf(_tmp("bad.gguf"), {"general.alignment": 16}, {})


def test_reads_a_file_written_by_the_gguf_package():
    gguf = need("gguf")
    path = _tmp("theirs.gguf")
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint32("llama.block_count", 3)
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_array("tokenizer.ggml.tokens", ["a", "b", "日"])
    w.add_array("xs", [1.5, 2.5])
    w.add_bool("flag", True)
    x = np.arange(64, dtype=np.float32).reshape(2, 32)
    w.add_tensor("w", x)
    w.add_tensor("e", np.zeros(0, dtype=np.float32).reshape(0))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ours = GGUFFile(path)
    assert ours.metadata["general.architecture"] == "llama" and ours.metadata["llama.block_count"] == 3
    assert ours.metadata["tokenizer.ggml.tokens"] == ["a", "b", "日"] and ours.metadata["xs"] == [1.5, 2.5]
    assert ours.metadata["flag"] is True
    assert torch.equal(ours.load("w"), torch.from_numpy(x))
    assert ours.tensors["e"].nbytes == 0 and ours.raw(ours.tensors["e"]).numel() == 0


# ---- malformed files, byte by byte --------------------------------------------------------------------
_TMP: list = []


@pytest.fixture(autouse=True)
def _tmpdir(tmp_path):
    _TMP[:] = [tmp_path]


def _tmp(name):
    return _TMP[0] / name


def _s(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def _kv(key: str, vtype: int, payload: bytes) -> bytes:
    return _s(key) + struct.pack("<I", vtype) + payload


def _file(kvs: list[bytes] = (), tensors: list[bytes] = (), data: bytes = b"", version=3, n_tensors=None,
          n_kv=None, magic=b"GGUF", align=32) -> bytes:
    head = magic + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                               len(kvs) if n_kv is None else n_kv) + b"".join(kvs) + b"".join(tensors)
    return head + b"\0" * (-len(head) % align) + data


def _tensor(name: str, dims: list[int], ttype: int = 0, offset: int = 0) -> bytes:
    return _s(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, ttype, offset)


def _refused(blob: bytes, needle: str) -> str:
    path = _tmp("bad.gguf")
    path.write_bytes(blob)
    with pytest.raises(LlmlabError) as err:
        GGUFFile(path)
    message = str(err.value)
    assert needle in message and str(path) in message, message
    return message


F32x4 = struct.pack("<4f", 1, 2, 3, 4)


def test_the_good_file_these_cases_start_from_reads():
    path = _tmp("good.gguf")
    path.write_bytes(_file([_kv("k", 4, struct.pack("<I", 5))], [_tensor("t", [4])], F32x4))
    f = GGUFFile(path)
    assert f.metadata == {"k": 5} and f.load("t").tolist() == [1.0, 2.0, 3.0, 4.0]
    assert f.tensors["t"].offset == 96  # header 24 + key/value 17 + tensor info 33 = 74 bytes, padded to 32


@pytest.mark.parametrize("blob,needle", [
    (b"GGUF" + b"\0" * 19, "not a GGUF file (only 23 bytes)"),
    (_file(magic=b"GGML"), "not a GGUF file (bad magic b'GGML')"),
    (_file(version=1), "unsupported GGUF version 1"),
    (_file(version=4), "unsupported GGUF version 4"),
    (_file(n_kv=10), "more than the file can hold"),
    (_file(n_tensors=3), "more than the file can hold"),
    (_file([_s("key")[:-1]], n_kv=1, align=1), "metadata key needs 3 bytes but only 2 remain"),
    (_file([_kv("k", 4, b"\1\0")], align=1), "value of 'k' needs 4 bytes but only 2 remain (truncated file?)"),
    (_file([_kv("k", 13, b"")] + [b"\0" * 20]), "metadata 'k' has unknown value type 13"),
    (_file([_kv("k", 9, struct.pack("<IQ", 77, 1))] + [b"\0" * 20]), "array 'k' has unknown item type 77"),
    (_file([_kv("k", 9, struct.pack("<IQ", 4, 1000))]), "array 'k' declares 1000 items, more than the file can hold"),
    (_file([_kv("k", 9, struct.pack("<IQ", 8, 1000))]), "array 'k' declares 1000 items"),
    (_file([_kv("k", 9, struct.pack("<IQIQIQIQ", 9, 1, 9, 1, 9, 1, 9, 1) + struct.pack("<IQ", 4, 0))] + [b"\0" * 40]),
     "arrays nested too deeply in 'k'"),
    (_file([_kv("k", 9, struct.pack("<IQ", 8, 2) + _s("ab") + struct.pack("<Q", 99) + b"xy")]),
     "a string in 'k' declares 99 bytes, more than remain"),
    (_file([_kv("k", 8, struct.pack("<Q", 99) + b"xy")]), "string value of 'k' needs 99 bytes"),
    (_file(tensors=[_s("t") + struct.pack("<I", 9) + b"\0" * 80]), "tensor 't' has 9 dimensions"),
    (_file([_kv("general.alignment", 4, struct.pack("<I", 48))]), "general.alignment=48 is not a power of two"),
    (_file([_kv("general.alignment", 4, struct.pack("<I", 0))]), "general.alignment=0 is not a power of two"),
    (_file([_kv("general.alignment", 6, struct.pack("<f", 32.0))]), "general.alignment=32.0 is not a power of two"),
    (_file(tensors=[_tensor("t", [4], ttype=99)], data=F32x4), "tensor 't' has unknown ggml type 99"),
    (_file(tensors=[_tensor("t", [2**40])], data=F32x4), "tensor 't' declares an absurd shape [1099511627776]"),
    (_file(tensors=[_tensor("t", [40], ttype=8)], data=b"\0" * 34), "not a multiple of its block size 32"),
    (_file(tensors=[_tensor("t", [5])], data=F32x4), "lies past the end of the file (needs bytes up to 84"),
    (_file(tensors=[_tensor("t", [4], offset=32)], data=F32x4 + b"\0" * 28), "lies past the end of the file"),
    (_file(tensors=[_tensor("t", [1]), _tensor("t", [1], offset=32)], data=F32x4 + b"\0" * 60), "'t' appears twice"),
])
def test_malformed_headers_are_refused_with_their_reason(blob, needle):
    _refused(blob, needle)


def test_edges_that_are_still_valid():
    # a tensor that ends exactly at the end of the file; alignment 1; a 2^63-byte claim is not a crash
    path = _tmp("edge.gguf")
    path.write_bytes(_file(tensors=[_tensor("t", [4])], data=F32x4))
    assert GGUFFile(path).load("t").tolist() == [1.0, 2.0, 3.0, 4.0]
    path.write_bytes(_file([_kv("general.alignment", 4, struct.pack("<I", 1))], [_tensor("t", [4])], F32x4, align=1))
    assert GGUFFile(path).tensors["t"].offset == 24 + 33 + 33
    # version 2 is read; invalid UTF-8 in a string is replaced, not fatal
    path.write_bytes(_file([_kv("k", 8, _s(b"a\xffb")), _kv("l", 9, struct.pack("<IQ", 8, 1) + _s(b"\xfe"))],
                           version=2))
    f = GGUFFile(path)
    assert f.version == 2 and f.metadata == {"k": "a\ufffdb", "l": ["\ufffd"]}
    # the exact byte budget: a string array whose last string ends at the last byte
    blob = _file([_kv("k", 9, struct.pack("<IQ", 8, 2) + _s("ab") + _s("cd"))], align=1)
    path.write_bytes(blob)
    assert GGUFFile(path).metadata["k"] == ["ab", "cd"]
    path.write_bytes(blob[:-1])
    with pytest.raises(LlmlabError, match="declares 2 bytes, more than remain"):
        GGUFFile(path)
    path.write_bytes(blob[:-3])
    with pytest.raises(LlmlabError, match="is truncated"):
        GGUFFile(path)


def test_known_but_unsupported_quantization_is_named_when_loaded():
    path = _tmp("q6k.gguf")
    path.write_bytes(_file(tensors=[_tensor("t", [256], ttype=11)], data=b"\0" * 110))
    f = GGUFFile(path)
    assert f.tensors["t"].type_name == "Q3_K"
    with pytest.raises(LlmlabError, match="tensor 't' uses quantization Q3_K, which llmlab cannot read yet"):
        f.load("t")


def test_missing_file_is_a_clean_error():
    with pytest.raises(LlmlabError, match="cannot read"):
        GGUFFile(_tmp("nope.gguf"))


def test_the_size_checks_are_tight_not_loose():
    path = _tmp("tight.gguf")
    u32 = struct.pack("<I", 7)
    cases = [
        (_file(align=1), {}),  # 24 bytes: a header with nothing in it
        # 30 smallest possible entries (empty key, one-byte value: 13 bytes each)
        (_file([_kv("", 0, b"\x05")] * 30, align=1), {"": 5}),
        (_file([_kv("k", 8, _s(""))], align=1), {"k": ""}),
        (_file([_kv("k", 9, struct.pack("<IQ", 4, 2) + u32 + u32)], align=1), {"k": [7, 7]}),
        (_file([_kv("k", 9, struct.pack("<IQ", 8, 2) + _s("ab") + _s(""))], align=1), {"k": ["ab", ""]}),
        # arrays nest three deep, not four
        (_file([_kv("k", 9, struct.pack("<IQIQIQ", 9, 1, 9, 1, 4, 1) + u32)], align=1), {"k": [[[7]]]}),
    ]
    for blob, metadata in cases:
        path.write_bytes(blob)
        assert GGUFFile(path).metadata == metadata
    _refused(_file([_kv("k", 9, struct.pack("<IQIQIQIQ", 9, 1, 9, 1, 9, 1, 4, 1) + u32)], align=1),
             "arrays nested too deeply")


def test_integer_metadata_picks_uint32_while_it_fits():
    path = _tmp("ints.gguf")
    values = {"a": 0, "b": 2**32 - 1, "c": 2**32, "d": -1}
    write_gguf(path, values, {})
    f = GGUFFile(path)
    assert f.metadata == values and [f.metadata_types[k] for k in values] == [4, 4, 11, 11]


U32, U64 = 2**32 - 1, 2**64 - 1


@pytest.mark.parametrize("blob,needle", [
    (_file(version=U32), f"unsupported GGUF version {U32}"),
    (_file(n_tensors=U64), "more than the file can hold"),
    (_file(n_kv=U64), "more than the file can hold"),
    (_file([_kv("k", U32, b"")] + [b"\0" * 20]), f"metadata 'k' has unknown value type {U32}"),
    (_file([_kv("k", 9, struct.pack("<IQ", U32, 1))] + [b"\0" * 20]), f"array 'k' has unknown item type {U32}"),
    (_file([_kv("k", 9, struct.pack("<IQ", 4, U64))] + [b"\0" * 20]), f"array 'k' declares {U64} items"),
    (_file([_kv("k", 8, struct.pack("<Q", U64) + b"xy")]), f"string value of 'k' needs {U64} bytes"),
    (_file(tensors=[_s("t") + struct.pack("<I", U32) + b"\0" * 80]), f"tensor 't' has {U32} dimensions"),
    (_file(tensors=[_tensor("t", [U64])], data=F32x4), f"tensor 't' declares an absurd shape [{U64}]"),
    (_file(tensors=[_tensor("t", [4], ttype=U32)], data=F32x4), f"tensor 't' has unknown ggml type {U32}"),
    (_file(tensors=[_tensor("t", [4], offset=U64 - 31)], data=F32x4), "lies past the end of the file"),
])
def test_header_integers_are_unsigned(blob, needle):
    """GGUF's counts, types, lengths, shapes and offsets are unsigned: all-ones bytes are a huge value,
    refused and named as such, never read as -1 (which would make a count of -1 items look harmless)."""
    _refused(blob, needle)
