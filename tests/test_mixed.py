"""Mixed precision from a sensitivity map: the plan's arithmetic, the `mixed` method through the
real gptqmodel backend (tiny Llama), and the effect on the real model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from workbench import methods
from workbench.core.errors import WorkbenchError
from workbench.methods import gptq
from workbench.methods.mixed import PLAN_FILE, dynamic_overrides, parse_widths, stored_bits
from workbench.methods.mixed import planner as mixed
from workbench.metrics import perplexity, sensitivity
from workbench.run import maps, results, runner
from workbench.sources import data, models


def block_map(kls: list[float], weights: int = 1000) -> sensitivity.SensitivityMap:
    """A per-block map with the given KL per block (values as `sensitivity.compute` writes them)."""
    cells = tuple(
        sensitivity.Cell(
            b, "block", (f"model.layers.{b}.mlp.up_proj", f"model.layers.{b}.mlp.down_proj"), weights, kl, kl
        )
        for b, kl in enumerate(kls)
    )
    return sensitivity.SensitivityMap("m", "fp", "rtn:bits=3", "t", "sha", 64, "block", cells, 0.1, 0.2)


RTN64 = lambda w: stored_bits(w, 64)  # noqa: E731


def test_plan_gives_the_most_sensitive_blocks_more_bits_within_the_budget():
    smap = block_map([0.1, 0.9, 0.2, 0.7, 0.05, 0.3])
    budget = (4 * RTN64(3) + 2 * RTN64(4)) / 6
    chosen = mixed.plan(smap, budget, (3, 4, 8), cost=RTN64)
    assert chosen.bits == (3, 4, 3, 4, 3, 3) and chosen.stored_bits <= budget + 1e-9
    control = mixed.against_map(chosen)
    assert control.bits == (4, 3, 3, 3, 4, 3) and control.stored_bits == chosen.stored_bits
    assert chosen.layer_bits()["model.layers.1.mlp.down_proj"] == 4
    assert dynamic_overrides(chosen) == {
        r"+:^model\.layers\.1\.mlp\.up_proj$": {"bits": 4},
        r"+:^model\.layers\.1\.mlp\.down_proj$": {"bits": 4},
        r"+:^model\.layers\.3\.mlp\.up_proj$": {"bits": 4},
        r"+:^model\.layers\.3\.mlp\.down_proj$": {"bits": 4},
    }
    assert "4-bit: 1, 3" in chosen.summary()


def test_plan_prefers_many_3_to_4_steps_over_one_4_to_8():
    """A budget for one 8-bit block (from 4) buys four 3->4 upgrades instead."""
    smap = block_map([1.0, 0.5, 0.5, 0.5, 0.5, 0.1])
    chosen = mixed.plan(smap, (4 * RTN64(4) + 2 * RTN64(3)) / 6, (3, 4, 8), cost=RTN64)
    assert 8 not in chosen.bits and chosen.count()[4] == 4


def test_plan_errors_say_what_to_do():
    smap = block_map([0.1, 0.2])
    with pytest.raises(WorkbenchError, match="below the smallest width: 3-bit weights already cost 3.347"):
        mixed.plan(smap, 3.0, (3, 4), cost=RTN64)
    with pytest.raises(WorkbenchError, match="above the largest width"):
        mixed.plan(smap, 9.0, (3, 4, 8), cost=RTN64)
    with pytest.raises(WorkbenchError, match="at least two"):
        mixed.plan(smap, 3.5, (4,), cost=RTN64)
    with pytest.raises(WorkbenchError, match="per-layer map"):
        mixed.plan(smap, 3.5, (3, 4), granularity="layer", cost=RTN64)
    with pytest.raises(WorkbenchError, match="widths='3;4' must be comma-separated integers"):
        parse_widths("3;4")
    with pytest.raises(WorkbenchError, match=r"widths \[5\] are not supported by RTN"):
        parse_widths("3,5")
    with pytest.raises(WorkbenchError, match="choose one of rtn"):
        methods.parse("mixed:base=hqq")


def test_mixed_method_puts_the_planned_bits_in_the_real_checkpoint(tiny_session, tmp_path, monkeypatch):
    """Through gptqmodel's RTN with `dynamic`: the 8-bit block's packed weights are 8/3 as tall.
    Built in a fresh process, as `compare` builds it: twice in CI a pytest worker that had loaded
    other quantization libraries before died while it ran this build in-process."""
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path))  # the map and plan go to a fresh cache
    budget = (RTN64(3) + RTN64(8)) / 2
    choice = f"mixed:widths=3,8:budget_bits={budget}:map_tokens=64"
    script = "import sys; sys.path.insert(0, sys.argv[1]); from test_mixed import inspect_build; inspect_build(*sys.argv[2:])"
    tests = str(Path(__file__).resolve().parent)
    args = [sys.executable, "-X", "faulthandler", "-c", script, tests, str(tiny_session.source.location), choice]
    child = subprocess.run([*args, str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert child.returncode == 0, f"exit {child.returncode}: {child.stderr[-3000:]}"
    seen = json.loads((tmp_path / "seen.json").read_text())
    used = torch.load(tmp_path / "used.pt")
    eight = seen["eight"]
    assert seen["scales"] == "torch.float16"  # stored as rtn stores them
    assert seen["dtype"] == "torch.float32"  # reloaded in the compute dtype, like rtn (gptqmodel's default is bf16)
    original = dict(models.load_model(tiny_session.source, "cpu").named_modules())
    for b in (0, 1):  # the reloaded layers multiply by the planned-width RTN weights (rtol: the product
        # of scale and code is taken in fp32 here, in fp16 by rtn's transformers reload: half an fp16 step)
        expected = gptq.rtn_dequantized(original[f"model.layers.{b}.mlp.down_proj"].weight, 8 if b in eight else 3, 64)
        torch.testing.assert_close(used[b], expected, atol=1e-6, rtol=1e-3)
    heights = {int(b): h for b, h in seen["heights"].items()}
    assert len(eight) == 1 and seen["config_bits"] == 3 and seen["dynamic"] == 7
    assert heights[eight[0]] == 256 * 8 // 32 and heights[1 - eight[0]] == 256 * 3 // 32
    assert seen["ppl"] > 1 and list((tmp_path / "sensitivity" / "plans").glob("*.json"))
    chosen = seen["layer_bits"]  # kept with the result, shown on demand
    assert chosen["model.layers.0.mlp.down_proj"] == (8 if 0 in eight else 3) and len(chosen) == 14
    assert "model.layers.1.mlp.down_proj: " in seen["details_text"]


def inspect_build(folder: str, choice: str, out: str) -> None:
    """Build `choice` on the tiny model in this process; write what the checkpoint test reads to `out`."""
    from workbench.core.config import EvalConfig, ModelSpec

    session = runner.Session.open(
        ModelSpec(folder, device="cpu"), EvalConfig(max_length=128, stride=128, max_tokens=512, decode_tokens=8)
    )
    with runner.build(session, choice, log=lambda m: None) as built:
        plan = json.loads((built.workdir / PLAN_FILE).read_text())["plan"]
        config = json.loads((built.workdir / "quantize_config.json").read_text())
        with safe_open(str(next(built.workdir.glob("*.safetensors"))), "pt") as f:
            heights = {b: f.get_slice(f"model.layers.{b}.mlp.down_proj.qweight").get_shape()[0] for b in (0, 1)}
        measured = runner.measure(session, built, log=lambda m: None)
        layers = dict(built.model.named_modules())
        with torch.inference_mode():
            used = {b: layers[f"model.layers.{b}.mlp.down_proj"](torch.eye(256)).T for b in (0, 1)}
        seen = {
            "eight": [int(u["name"].split()[1]) for u, b in zip(plan["units"], plan["bits"]) if b == 8],
            "config_bits": config["bits"],
            "dynamic": len(config["dynamic"]),
            "heights": heights,
            "ppl": measured.perplexity.ppl,
            "dtype": str(built.model.get_input_embeddings().weight.dtype),
            "scales": str(layers["model.layers.0.mlp.down_proj"].scales.dtype),
            "layer_bits": built.details["layer_bits"],
            "details_text": results.format_details([_result_with(built.details)]),
        }
    torch.save(used, Path(out) / "used.pt")
    (Path(out) / "seen.json").write_text(json.dumps(seen))


def _result_with(details: dict) -> results.Result:
    return results.Result(model="tiny", method="mixed", family="gptq", bits=3, params={}, device="cpu", details=details)


def fake_quantized_ppl(model, originals: dict, plan: mixed.Plan, ids) -> float:
    """Perplexity with every block linear fake-quantized (RTN, group 64) at its planned width."""
    modules = dict(model.named_modules())
    for name, bits in plan.layer_bits().items():
        modules[name].weight.data = gptq.rtn_dequantized(originals[name], bits, 64)
    return perplexity.perplexity(model, ids, 512, 512, batch_size=2).ppl


def test_mixed_runs_from_the_command_line_on_a_one_core_machine(tiny_folder, tmp_path):
    """gptqmodel refuses a CPU pool of one worker; `mixed` asks for at least two, as `gptq` does.
    In a fresh process (gptqmodel reads the setting when it starts its pool) whose
    `os.cpu_count()` says 1, with nothing set by the environment."""
    script = "import os, sys; os.cpu_count = lambda: 1; from workbench.cli import main; sys.exit(main(sys.argv[1:]))"
    env = {k: v for k, v in os.environ.items() if k != "GPTQMODEL_CPU_WORKERS"}
    env["WORKBENCH_CACHE"] = str(tmp_path / "cache")
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            "compare",
            "--model",
            str(tiny_folder),
            "--methods",
            "mixed:budget_bits=5:map_tokens=64",
            "--in-process",
            "--max-length",
            "128",
            "--max-tokens",
            "256",
            "--decode-tokens",
            "0",
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {row["method"]: row for row in json.loads((tmp_path / "out" / "results.json").read_text())}
    assert rows["mixed"]["error"] is None and rows["mixed"]["ppl"] > 1


def test_map_guided_mix_beats_uniform_3_bit_and_the_mix_against_the_map(bundled_source):
    """The effect on SmolLM2 at ~3.33 bits (10 of 30 blocks at 4 bits), with the RTN arithmetic
    the real backend uses (`rtn_dequantized` equals gptqmodel's checkpoint, see test_sensitivity);
    the map on 128 calibration tokens, perplexity on 1,024 evaluation tokens."""
    smap = maps.compute(bundled_source, "rtn:bits=3:group_size=64", tokens=128, unit="block", log=lambda m: None)
    budget = (20 * RTN64(3) + 10 * RTN64(4)) / 30
    guided = mixed.plan(smap, budget, (3, 4), cost=RTN64)
    control = mixed.against_map(guided)
    uniform = mixed.plan(smap, RTN64(3), (3, 4), cost=RTN64)
    assert guided.count() == {3: 20, 4: 10} and control.stored_bits == guided.stored_bits
    model = models.load_model(bundled_source, "cpu")
    originals = {name: m.weight.data.clone() for name, m in models.block_linears(model)}
    ids = data.eval_tokens(models.load_tokenizer(bundled_source), data.builtin_eval_text(), 1024)
    with torch.inference_mode():
        ppl = {
            name: fake_quantized_ppl(model, originals, p, ids)
            for name, p in (("guided", guided), ("control", control), ("uniform3", uniform))
        }
    print(ppl)
    assert ppl["guided"] < ppl["uniform3"] and ppl["guided"] < ppl["control"]
