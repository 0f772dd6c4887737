"""The start-of-run summary: printed before step 1 with data, truncation, epochs, LoRA and placement."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from streamtune.cli import main
from streamtune.train.metrics import read_metrics


def _run(tmp_path, run_dict, capsys, **sections):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(run_dict(tmp_path / "run", **sections)))
    code = main(["train", str(cfg)])
    return code, capsys.readouterr().err


def test_summary_before_the_first_step(tmp_path, run_dict, capsys):
    lines = [json.dumps({"text": " ".join(["word"] * n)}) for n in (5, 80, 6, 7, 90, 4, 5, 6)]
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(lines) + "\n")
    code, err = _run(tmp_path, run_dict, capsys, data={"path": str(data), "format": "text", "seq_len": 32},
                     train={"max_steps": 2, "batch_size": 1, "grad_accum": 2},
                     lora={"targets": ["q_proj", "down_proj"]}, memory={"stream": "all"})
    assert code == 0, err
    summary = err[:err.index("steps 1-2: loss")]
    data_line = re.search(r"data: 8 records \(text, loss on all tokens\) -> (\d+) packed sequences of up to 32 tokens "
                          r"per epoch; ([\d,]+) tokens", summary)
    assert data_line, summary
    rows = int(data_line.group(1))
    assert re.search(rf"truncated: 2 of 8 samples are longer than data\.seq_len=32; [\d,]+ tokens cut "
                     rf"\(first: {re.escape(str(data))}:2 \(\d+ tokens\)", summary)
    assert f"steps: 2 x 2 sequences (train.batch_size 1 x train.grad_accum 2) = 4 sequences = {4 / rows:.2f} epochs" in summary
    assert re.search(r"LoRA r=4: self_attn\.q_proj 4 layers \(sizes differ\) = [\d,]+; mlp\.down_proj 4 layers x 640 = "
                     r"2,560; total [\d,]+ trainable", summary)
    assert "placement: 0 resident, 4 streamed decoder layers (codec bf16, ring 2 slots, prefetch 1); streamed: 0-3" in summary
    assert "kernels: auto (fused loss)" in summary and "compiled" not in summary  # the CPU: no layer compile
    assert len(read_metrics(tmp_path / "run")) == 2


def test_bad_lora_target_exits_2_before_the_run_dir(tmp_path, run_dict, capsys):
    code, err = _run(tmp_path, run_dict, capsys, lora={"targets": ["q_proj", "vproj"]})
    assert code == 2
    assert "error: lora.targets: 'vproj' matches no module of Gemma4ForCausalLM (did you mean 'v_proj'?)" in err
    assert "self_attn.k_proj" in err
    assert not (tmp_path / "run").exists()
    code, err = _run(tmp_path, run_dict, capsys, lora={"target_parameters": ["experts.up_proj"]})
    assert code == 2 and "lora.target_parameters: 'experts.up_proj' matches no parameter" in err
    assert "experts.gate_up_proj, experts.down_proj" in err and not (tmp_path / "run").exists()
    # checked from the model's config before the data is read
    code, err = _run(tmp_path, run_dict, capsys, lora={"targets": ["vproj"]}, data={"path": str(tmp_path / "none.jsonl")})
    assert code == 2 and "lora.targets: 'vproj'" in err and "data.path" not in err


@pytest.mark.gpu
def test_summary_shows_the_plan_on_a_gpu(tmp_path, run_dict, capsys):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    code, err = _run(tmp_path, run_dict, capsys, train={"max_steps": 1, "device": "cuda"},
                     memory={"stream": "all", "codec": "int8"})
    assert code == 0, err
    assert re.search(r"placement: 0 resident, 4 streamed decoder layers \(codec int8, .*; plan: GPU peak [\d.]+ (MiB|GiB) "
                     r"of [\d.]+ (MiB|GiB), [\d.]+ s per micro-batch", err), err


def test_kernels_line_names_the_pieces_and_the_first_steps_compile():
    from streamtune.kernels import select_kernels
    from streamtune.train.summary import kernels_line

    h200 = select_kernels("auto", "cuda", "bfloat16", (9, 0))
    line = kernels_line(h200, {"compiled_layers": 30})
    assert line.startswith("kernels: auto (FlexAttention, heads wider than 256 as chunked GEMMs from 4096 tokens, "
                           "fused loss, LoRA in the compute dtype, fused norms and "
                           "activations, routed experts); 30 decoder layers compiled"), line
    assert "first step also compiles" in line
    assert kernels_line(select_kernels("eager", "cuda", "bfloat16", (9, 0))) == "kernels: eager (the stock HF/PEFT path)"
    assert kernels_line(None) is None
