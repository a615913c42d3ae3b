"""Every registered method on a tiny model: it quantizes, perplexity is finite, storage shrinks
as the bits say, and the saved copy reloads to the same numbers. Plus the registry's contract."""

from __future__ import annotations

import math

import pytest

from workbench import methods
from workbench.core.errors import WorkbenchError
from workbench.methods import QuantizeRequest
from workbench.metrics import perplexity
from workbench.run import runner

CPU_METHODS = [m.name for m, reason in methods.available("cpu") if reason is None]
# The tiny model is a transformers folder; gguf methods start from a .gguf (tests/test_gguf.py).
SAVABLE_CPU_METHODS = [name for name in CPU_METHODS if methods.get(name).serializable]
GPU_ONLY = [m.name for m in methods.REGISTRY.values() if "cpu" not in m.devices]

# Storage bits per weight of the block linears, scales/zeros included, for the tiny model.
EXPECTED_BITS = {32: (32, 32), 16: (16, 16), 8: (8, 8.7), 4: (4, 6.1), 3: (3, 5.1), 2: (2, 4.1)}


def test_every_family_is_registered_with_its_declarations():
    families = {m.family for m in methods.REGISTRY.values()}
    assert {"baseline", "bitsandbytes", "gptq", "awq", "quanto", "hqq", "torchao"} <= families
    for method in methods.REGISTRY.values():
        info = method.describe()
        assert info["name"] == method.name and isinstance(info["bits"], int)
        assert (info["reason"] is None) == info["available"]
        if method.backend:
            assert info["pip"].startswith("pip install")


def test_duplicate_registration_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        methods.register(methods.get("fp32"))


def test_all_cpu_capable_methods_are_available_here():
    # The CI environment installs every backend: nothing that can run on CPU may be missing.
    missing = [(m.name, reason) for m, reason in methods.available("cpu") if reason and "cpu" in m.devices]
    assert not missing


@pytest.mark.parametrize(
    "choice,message",
    [
        ("gptq:bits=5", "bits=5 is not supported; choose one of 2, 3, 4, 8"),
        ("nope", "unknown method 'nope'"),
        ("hqq:size=3", "unknown parameter(s) size"),
        ("bnb-nf4:double_quant=maybe", "double_quant='maybe' is not a bool"),
        ("gptq:bits", "parameters are written name:key=value"),
        ("gptq:group_size=abc", "group_size='abc' is not a int"),
    ],
)
def test_bad_choices_say_what_to_do(choice, message):
    with pytest.raises(WorkbenchError) as err:
        methods.parse_choice(choice)
    assert message in str(err.value)


def test_parse_choice_coerces_and_labels():
    method, params = methods.parse_choice("gptq:bits=8:act_order=true")
    assert params["bits"] == 8 and params["act_order"] is True and params["group_size"] == 64
    assert methods.parse("gptq:bits=8:act_order=true").label == "gptq(bits=8, act_order=True)"
    assert method.bits_for(params) == 8


def test_gguf_presets_name_llama_cpp_s_file_types():
    assert methods.parse("gguf-q4_k_m").params == methods.parse("gguf:type=Q4_K_M").params
    assert methods.parse("gguf-q4_k_m-imat").params == methods.parse("gguf-imat:type=Q4_K_M").params
    assert methods.parse("gguf-q8_0:runtime=torch").params == {"type": "Q8_0", "runtime": "torch"}
    with pytest.raises(WorkbenchError, match="type is set twice"):
        methods.parse("gguf-q8_0:type=Q4_0")


@pytest.mark.parametrize("name", GPU_ONLY)
def test_gpu_only_methods_say_so_on_cpu(name):
    assert "cuda only" in methods.get(name).unavailable_reason("cpu")


def test_group_size_that_does_not_divide_a_layer_is_refused_before_quantizing(tiny_session, tmp_path):
    # The tiny model's layers are 128 and 256 wide: 96 fits neither.
    result = runner.run_method(tiny_session, "hqq:group_size=96", log=lambda m: None)
    assert result.error and "group_size=96 does not divide the input width 128" in result.error
    assert "32, 64, 128" in result.error


@pytest.mark.parametrize("name", SAVABLE_CPU_METHODS)
def test_method_quantizes_measures_and_reloads(name, tiny_session, tmp_path):
    method, params = methods.parse_choice(name)
    result = runner.run_method(tiny_session, name, log=lambda m: None)
    assert result.error is None, result.error
    assert math.isfinite(result.ppl) and result.ppl > 1
    low, high = EXPECTED_BITS[result.bits]
    assert low <= result.bits_per_weight <= high, f"{name}: {result.bits_per_weight:.2f} bits per weight"
    assert result.protocol["n_tokens"] == len(tiny_session.eval_ids) - 1

    # The shipped path: save, reload, same numbers.
    request = QuantizeRequest(
        tiny_session.source,
        params,
        "cpu",
        tmp_path / "work",
        _calibration(method, params, tiny_session),
        log=lambda m: None,
    )
    request.workdir.mkdir()
    model = method.quantize(request)
    before = _ppl(model, tiny_session)
    method.save(model, tmp_path / "saved")
    reloaded = method.reload(tmp_path / "saved", request)
    assert _ppl(reloaded, tiny_session) == pytest.approx(before, rel=1e-4)


def _calibration(method, params, session):
    from workbench.sources import data

    if not method.needs_calibration:
        return None
    return data.calibration_blocks(session.tokenizer, 4, 64)


def _ppl(model, session):
    return perplexity.perplexity(model, session.eval_ids, 128, 128).ppl


def test_gptqmodel_methods_run_on_a_one_core_machine(tiny_folder, tmp_path):
    """gptqmodel refuses a CPU thread pool of 1 ("requests 2 workers but parent 'cpu' only has 1"):
    on one core the workbench still asks it for 2."""
    import subprocess
    import sys

    script = (
        "import os, sys; os.cpu_count = lambda: 1; os.environ.pop('GPTQMODEL_CPU_WORKERS', None); "
        "from workbench.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    argv = [
        "compare",
        "--model",
        tiny_folder,
        "--methods",
        "rtn",
        "--out",
        tmp_path / "out",
        "--max-length",
        "64",
        "--max-tokens",
        "64",
        "--decode-tokens",
        "0",
        "--in-process",
    ]
    done = subprocess.run([sys.executable, "-c", script, *map(str, argv)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
