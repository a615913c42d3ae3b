"""What a GGUF file stores, read from its header: the same tensor table as gguf's own reader, in a
file with every kind of metadata value (strings, arrays of strings and numbers, booleans)."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture
def small_gguf(tmp_path):
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize

    path = tmp_path / "small.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_name("small")
    writer.add_uint32("small.count", 7)
    writer.add_float32("small.scale", 0.5)
    writer.add_bool("small.flag", True)
    writer.add_int64("small.big", -(2**40))
    writer.add_array("small.tokens", ["a", "bé", "", "ünïcode"] * 300)
    writer.add_array("small.scores", [0.25, -1.0, 3.0])
    writer.add_array("small.nested", [[1, 2], [3]])
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((64, 96)).astype(np.float32)
    writer.add_tensor("blk.0.ffn_up.weight", weight)
    writer.add_tensor("blk.0.attn_norm.weight", rng.standard_normal(96).astype(np.float32))
    q8 = quantize(weight, GGMLQuantizationType.Q8_0)
    writer.add_tensor("blk.0.ffn_down.weight", q8, raw_shape=q8.shape, raw_dtype=GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_the_header_gives_the_same_tensor_table_as_gguf_s_reader(small_gguf):
    from gguf import GGUFReader

    from workbench.methods.gguf import stored

    theirs = [
        (t.name, t.tensor_type.name, int(t.shape[0]), int(t.n_elements), int(t.n_bytes))
        for t in GGUFReader(small_gguf).tensors
    ]
    assert list(stored._weights(small_gguf)) == theirs
    assert [t[1] for t in theirs] == ["F32", "F32", "Q8_0"]
    assert stored.type_mix(small_gguf) == {"F32": 0.5, "Q8_0": 0.5}


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    from workbench.methods.gguf import stored

    other, empty = tmp_path / "model.gguf", tmp_path / "empty.gguf"
    other.write_bytes(b"not a gguf file at all" * 10)
    empty.write_bytes(b"")
    for path in (other, empty):
        with pytest.raises(ValueError, match="not a GGUF file"):
            stored._weights(path)
