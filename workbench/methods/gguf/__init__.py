"""GGUF: llama.cpp's own file types (Q8_0 ... Q2_K, IQ4_XS), quantized by llama.cpp's quantizer.

The model's F32 GGUF (`workbench.sources.gguf_f32`) is quantized with `llama_model_quantize` in
the build's working folder, then measured on the same windows as every other row, in one of two
runtimes:
- `runtime=llama.cpp` (default): the file in llama.cpp's runtime, where GGUF files are deployed
  (llama.cpp also rounds activations to 8 bits in its dot products); speed and memory are
  llama.cpp's.
- `runtime=torch`: the file's weights dequantized into the transformers model, so the number shows
  the effect of the stored weights alone, like every other method's row.
Bytes and bits per weight are read from the written file, and so is the mix of types llama.cpp
really chose (`compare --details`).

`gguf-imat` is llama-quantize with `--imatrix`: the same file type, each tensor in the type
llama.cpp chose for it, but quantized again by ggml's quantizer weighted by an importance matrix
from the calibration blocks (`imatrix`, `retype`); cyllama 0.2.18 cannot pass one to llama.cpp.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

from workbench.methods.base import Method, Param, compute_bits
from workbench.methods.gguf import stored
from workbench.methods.gptq import BLOCK_TOKENS, SAMPLES

FILE_TYPES = {
    # llama.cpp's `llama_ftype` value, nominal bits, and bits per weight of the file type's main type.
    "F32": (0, 32, 32.0),  # no quantization: checks that llama.cpp scores like the fp32 reference
    "Q8_0": (7, 8, 8.5),
    "Q6_K": (18, 6, 6.5625),
    "Q5_K_M": (17, 5, 5.5),
    "Q4_K_M": (15, 4, 4.85),
    "Q4_0": (2, 4, 4.5),
    "Q3_K_M": (12, 3, 3.9),
    "Q2_K": (10, 2, 2.6),
    "IQ4_XS": (30, 4, 4.25),
}
RUNTIMES = ("llama.cpp", "torch")
PIP = "pip install cyllama==0.2.18"
PIP_GGML = f"{PIP} libggml-python==0.20.2.post1"
IMATRIX_FILE = "imatrix.gguf"


def _file(workdir, params):
    return workdir / f"{params['type']}.gguf"


def _imat_file(workdir, params):
    return workdir / f"{params['type']}-imat.gguf"


def _map_file(workdir, params):
    return workdir / f"map-mix-{params['type']}-bytes.gguf"


def _kernel(params) -> str:
    if params["runtime"] == "llama.cpp":
        from workbench.methods.gguf.llama_cpp import RELEASE

        return f"{params['type']} in {RELEASE}"
    return f"{params['type']} dequantized into torch fp32"


def _threads() -> int:
    import torch

    return torch.get_num_threads()  # the thread count every other row runs with


def _llama_cpp_file(request, file_type: str):
    """The model quantized to `file_type` by llama.cpp, with its own per-tensor type rules."""
    from workbench.methods.gguf import llama_cpp
    from workbench.sources import gguf_f32

    source = gguf_f32.f32_gguf(request.source, request.log)
    out = _file(request.workdir, {"type": file_type})
    request.log(f"[gguf] llama.cpp quantizes {source.name} to {file_type}...")
    llama_cpp.quantize_file(source, out, FILE_TYPES[file_type][0], _threads())
    return source, out


def _load(request, path):
    if request.params["runtime"] == "llama.cpp":
        from workbench.methods.gguf import llama_cpp

        return llama_cpp.LlamaCppModel(path, _threads())
    return _dequantized(request.source, path)


def _quantize(request):
    return _load(request, _llama_cpp_file(request, request.params["type"])[1])


def importance(request):
    """The importance matrix of the calibration blocks, saved beside the file as llama.cpp's imatrix GGUF."""
    from workbench.methods.gguf import imatrix
    from workbench.sources import data, models

    request.log(f"[gguf] importance matrix from {len(request.calibration)} calibration blocks...")
    model = models.load_model(request.source, "cpu")
    collected = imatrix.collect(model, request.calibration, data.builtin_calibration_text().name, request.log)
    del model
    imatrix.save(collected, request.workdir / IMATRIX_FILE)
    return collected


def _quantize_with_importance(request):
    """llama.cpp's file for the type gives the metadata and each tensor's type; ggml's quantizer
    then quantizes every tensor again, weighted by the importance matrix."""
    from workbench.methods.gguf import retype

    source, template = _llama_cpp_file(request, request.params["type"])
    weights = importance(request)
    out = _imat_file(request.workdir, request.params)
    retype.write(template, source, out, importance=weights, log=request.log)
    template.unlink()
    return _load(request, out)


def _dequantized(source, path):
    """The transformers model with every weight replaced by the file's, dequantized by transformers'
    GGUF reader (which also undoes llama.cpp's reordering of the query and key rows)."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from workbench.sources import models

    model = models.load_model(source, "cpu")
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        from workbench.core.errors import WorkbenchError

        raise WorkbenchError(
            f"gguf: the file's tensors do not match the model (missing {sorted(set(missing) - tied)[:3]}, "
            f"unexpected {unexpected[:3]})."
        )
    return model.eval()


def _storage(method, params, device):
    """The file type's main type; tensors that llama.cpp keeps in other types move the real size."""
    return FILE_TYPES[params["type"]][2], compute_bits(device)


def _quantize_map_mix(request):
    """A map-guided mix (`mix`) at the bytes llama.cpp's own file of the type spends on block tensors."""
    from gguf import GGMLQuantizationType, GGUFReader

    from workbench.methods.gguf import mix, retype
    from workbench.metrics import sensitivity

    source, template = _llama_cpp_file(request, request.params["type"])
    weights = importance(request)
    smap, _ = sensitivity.load_or_compute(
        request.source, mix.fake_quantize, mix.MAP_METHOD, request.params["map_tokens"], "layer", log=request.log
    )
    map_kl = {weights.names[cell.layers[0]]: cell.kl for cell in smap.cells}
    f32 = {t.name: t.data for t in GGUFReader(source).tensors}
    budget = sum(int(t.n_bytes) for t in GGUFReader(template).tensors if t.name in map_kl)
    request.log(f"[gguf] choosing types for {len(map_kl)} tensors within {budget / 1e6:.1f} MB...")
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # ggml's quantizer runs outside the GIL
        ladders = dict(
            zip(map_kl, pool.map(lambda name: mix.options(f32[name], weights.mean(name), map_kl[name]), map_kl))
        )
    chosen = mix.plan(ladders, budget)
    types = {name: GGMLQuantizationType[option.kind] for name, option in chosen.items()}
    out = _map_file(request.workdir, request.params)
    retype.write(template, source, out, types, weights, request.log)
    template.unlink()
    return _load(request, out)


TYPE = Param("type", "Q4_K_M", "llama.cpp file type.", tuple(FILE_TYPES))
MAP_TOKENS = Param("map_tokens", 512, "Calibration tokens the sensitivity map is measured on.", minimum=16)
RUNTIME = Param("runtime", "llama.cpp", "Measure in llama.cpp, or dequantized into the torch model.", RUNTIMES)
STORAGE_NOTE = (
    "llama.cpp keeps some tensors in other types (more bits for some layers, fallbacks for rows that do not "
    "fit a type's blocks): the file's real mix is in the details"
)
LIMITS = (
    "Starts from a .gguf model (the bundled model or your own .gguf file), or a fine-tune merged by the "
    "workbench from one; another transformers folder must be converted with llama.cpp's convert_hf_to_gguf.py first.",
    "CPU only: cyllama's wheel is llama.cpp built for CPUs.",
    "Small models: k-quant and IQ types need rows that are a multiple of 256 weights; llama.cpp stores "
    "other tensors in fallback types, which the details show.",
)


def _file_method(name: str, summary: str, quantize, file, params=(), mix_label="", **extra) -> Method:
    """A method whose build is one GGUF file in its working folder, measured like any row.
    `mix_label`: the file holds types of the workbench's choosing, described so."""
    return Method(
        name=name,
        family="gguf",
        bits=4,
        bits_of=lambda params: FILE_TYPES[params["type"]][1],
        summary=summary,
        params=(TYPE, RUNTIME, *params),
        quantize=quantize,
        devices=("cpu",),
        kernel="GGUF",
        storage=_storage,
        storage_note=STORAGE_NOTE,
        file_storage=lambda workdir, params: stored.storage(file(workdir, params), _kernel(params)),
        details=lambda workdir, params: stored.details(
            file(workdir, params), mix_label.format(params["type"]) or params["type"], fallback=not mix_label
        ),
        limits=LIMITS,
        **extra,
    )


METHODS = (
    _file_method(
        "gguf",
        "llama.cpp's file types (Q8_0 ... Q2_K, IQ4_XS) by llama.cpp's own quantizer, run in llama.cpp.",
        _quantize,
        _file,
        backend="cyllama",
        pip=PIP,
        exports=lambda workdir, params: [_file(workdir, params)],
    ),
    _file_method(
        "gguf-imat",
        "llama.cpp's file type with an importance matrix from the calibration blocks (llama-quantize --imatrix).",
        _quantize_with_importance,
        _imat_file,
        (SAMPLES, BLOCK_TOKENS),
        needs_calibration=True,
        backend="libggml",
        pip=PIP_GGML,
        exports=lambda workdir, params: [_imat_file(workdir, params), workdir / IMATRIX_FILE],
    ),
    _file_method(
        "gguf-map",
        "Per-tensor ggml types chosen from the sensitivity map, at the bytes of llama.cpp's own file of the type.",
        _quantize_map_mix,
        _map_file,
        (SAMPLES, BLOCK_TOKENS, MAP_TOKENS),
        needs_calibration=True,
        backend="libggml",
        pip=PIP_GGML,
        exports=lambda workdir, params: [_map_file(workdir, params), workdir / IMATRIX_FILE],
        mix_label="map mix at the bytes of llama.cpp's {}",
    ),
)

PRESETS = {
    **{f"gguf-{t.lower()}": f"gguf:type={t}" for t in FILE_TYPES if t != "F32"},
    **{f"gguf-{t.lower()}-imat": f"gguf-imat:type={t}" for t in FILE_TYPES if t != "F32"},
}
"""Short names for llama.cpp's file types, as people call the files: `gguf-q4_k_m` is
`gguf:type=Q4_K_M`, `gguf-q4_k_m-imat` is `gguf-imat:type=Q4_K_M`."""
